"""`python -m voicetune.tools.preflight [--root DIR]`: before `dvc repro`, every problem of
params.yaml and of the files the pipeline reads (voicetune.project.preflight); `make repro`
runs it first. Exit status 1 with the project's message when there is one, nothing written.
"""
import argparse
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.project import preflight
from voicetune.project.preflight import check


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=preflight.__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="the project folder")
    args = ap.parse_args(argv)
    check(args.root)


if __name__ == "__main__":
    run_stage("preflight", main)
