"""Which BLAS MLX computes with here, and why: every candidate probed, with what it measured.

    python -m voicetune.blas_report        # or: make blas

The first good candidate in the table is the one every stage loads (see voicetune/blas.py);
the order decides, not the speed. The verdict cache is refreshed.
"""
from __future__ import annotations

import argparse
import sys

from . import blas
from .blas import Choice, cache_file, candidates, choose, describe


def table(choice: Choice) -> str:
    """Every candidate's verdict as a Markdown table (``make blas``)."""
    rows = ["| candidate | verdict | core | threads | GFLOP/s | probe s | build |",
            "|---|---|---|---|---|---|---|"]
    for c, v in choice.examined:
        state = "chosen" if c == choice.candidate else ("ok" if v.ok else f"rejected: {v.reason}")
        rows.append(f"| {c.name}: `{c.path}` | {state} | {v.core or ''} | {v.threads or ''} | "
                    f"{v.gflops if v.gflops is not None else ''} | {v.probe_s:.2f} | {v.config or ''} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voicetune.blas_report", description=(
        "Probe every BLAS candidate for MLX in a child process and print what each measured; "
        "the cache of verdicts is refreshed."))
    ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("macOS: MLX uses Accelerate and Metal; nothing to choose.")
        return 0
    at_import = blas.chosen  # what `import voicetune` chose for this process, before the table
    print(table(choose(candidates(), every=True)))
    if at_import is not None:
        how = "probed" if any(not v.cached for _, v in at_import.examined) else "cached verdicts"
        print(f"\nthis process loaded: {describe()} (chosen in {at_import.seconds * 1000:.1f} ms, {how})")
    print(f"verdicts cached in {cache_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
