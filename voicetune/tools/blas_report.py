"""Which BLAS MLX computes with here, and why: every candidate probed, with what it measured.

    python -m voicetune.tools.blas_report                 # or: make blas
    python -m voicetune.tools.blas_report --measure 5     # + GFLOP/s side by side, 5 rounds, medians
    python -m voicetune.tools.blas_report --measure 5 --coretype Haswell   # DYNAMIC_ARCH's AVX2 kernels

The first good candidate in the table is the one every stage loads (see voicetune/core/blas.py);
the order decides, not the speed. The verdict cache is refreshed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from voicetune.core import blas
from voicetune.core.blas import Choice, cache_file, candidates, choose, describe


def table(choice: Choice) -> str:
    """Every candidate's verdict as a Markdown table (``make blas``)."""
    rows = ["| candidate | verdict | core | threads | GFLOP/s | probe s | build |",
            "|---|---|---|---|---|---|---|"]
    for c, v in choice.examined:
        state = "chosen" if c == choice.candidate else ("ok" if v.ok else f"rejected: {v.reason}")
        rows.append(f"| {c.name}: `{c.path}` | {state} | {v.core or ''} | {v.threads or ''} | "
                    f"{v.gflops if v.gflops is not None else ''} | {v.probe_s:.2f} | {v.config or ''} |")
    return "\n".join(rows)


# One library, one fresh process, loaded before MLX as voicetune would, then timed by the
# same function as every stage's check (voicetune's own choice switched off in that child).
_RATE = r"""
import ctypes, json, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
from voicetune.core.blas import matmul_gflops
print(json.dumps({n: matmul_gflops(int(n)) for n in sys.argv[2:]}))
"""


def measure(paths: list[str], rounds: int, sizes=(256, 1024, 2048),
            coretype: str | None = None) -> dict[str, dict[int, float]]:
    """GFLOP/s of MLX's float32 matmul through each library, the libraries interleaved in
    every round (a noisy machine slows them alike), median over rounds per size."""
    env = dict(os.environ, VOICETUNE_NO_OPENBLAS="1",
               **({"OPENBLAS_CORETYPE": coretype} if coretype else {}))
    seen: dict[str, dict[int, list[float]]] = {p: {n: [] for n in sizes} for p in paths}
    for _ in range(rounds):
        for path in paths:
            out = subprocess.run([sys.executable, "-P", "-c", _RATE, path, *map(str, sizes)],
                                 capture_output=True, text=True, env=env, check=True)
            for n, rate in json.loads(out.stdout).items():
                seen[path][int(n)].append(rate)
    return {p: {n: statistics.median(r) for n, r in by.items()} for p, by in seen.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voicetune.tools.blas_report", description=(
        "Probe every BLAS candidate for MLX in a child process and print what each measured; "
        "the cache of verdicts is refreshed."))
    ap.add_argument("--measure", type=int, default=0, metavar="ROUNDS",
                    help="also time MLX's matmul through every good candidate, interleaved")
    ap.add_argument("--coretype", help="OPENBLAS_CORETYPE for --measure (e.g. Haswell: the "
                    "AVX2 kernels a DYNAMIC_ARCH build would pick on a CPU without AVX-512)")
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("macOS: MLX uses Accelerate and Metal; nothing to choose.")
        return 0
    at_import = blas.chosen  # what `import voicetune` chose for this process, before the table
    every = choose(candidates(), every=True)
    print(table(every))
    if args.measure:
        good = [c for c, v in every.examined if v.ok]
        rates = measure([c.path for c in good], args.measure, coretype=args.coretype)
        sizes = sorted(next(iter(rates.values()), {}))
        print(f"\nMLX float32 matmul, GFLOP/s (median of {args.measure} interleaved rounds"
              f"{', OPENBLAS_CORETYPE=' + args.coretype if args.coretype else ''}):\n")
        print("| candidate | " + " | ".join(f"{n}×{n}" for n in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for c in good:
            print(f"| {c.name} | " + " | ".join(f"{rates[c.path][n]:.0f}" for n in sizes) + " |")
    if at_import is not None:
        how = "probed" if any(not v.cached for _, v in at_import.examined) else "cached verdicts"
        print(f"\nthis process loaded: {describe()} (chosen in {at_import.seconds * 1000:.1f} ms, {how})")
    print(f"verdicts cached in {cache_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
