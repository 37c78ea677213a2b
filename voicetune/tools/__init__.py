"""The command-line tools behind the Makefile's targets, one thin module each, run as
``python -m voicetune.tools.<tool>``: argument parsing and printing over library calls.

The top floor: a tool may import anything; nothing imports a tool.
"""
