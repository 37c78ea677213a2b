"""Test harnesses shared by several test files: each lives here once."""
