"""`make architecture`: render docs/architecture.md from the code, and print its figures."""
import argparse
import json
from pathlib import Path

from voicetune.core.errors import UserError, run_stage
from voicetune.core.files import write_text_atomic
from voicetune.project.architecture import figures, render, violations


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the repository (default: here)")
    ap.add_argument("--out", default="docs/architecture.md")
    args = ap.parse_args(argv)
    root = Path(args.root)
    problems = violations(root)
    if problems:
        raise UserError("imports that break the rooms' rule (voicetune/project/architecture.py "
                        "ALLOWED):\n" + "\n".join(f"  {p}" for p in problems))
    write_text_atomic(root / args.out, render(root))
    print(json.dumps(figures(root), indent=2))


if __name__ == "__main__":
    run_stage("architecture", main)
