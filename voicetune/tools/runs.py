"""The runs side by side, with the columns people compare (`make runs`).

    python -m voicetune.tools.runs            # the workspace, HEAD and its experiments
    python -m voicetune.tools.runs -n 5       # HEAD and the 4 commits before it, with experiments
"""
from __future__ import annotations

import argparse
import sys

from voicetune.core.errors import run_stage
from voicetune.evaluate.runs import curate, render


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--num", type=int, default=1, help="commits to show from HEAD back")
    ap.add_argument("--rev", action="append", help="start from this commit/branch/tag (repeatable)")
    args = ap.parse_args(argv)
    import dvc.api

    rows = dvc.api.exp_show(revs=args.rev, num=args.num)
    print(render(*curate(rows)))
    return 0


if __name__ == "__main__":
    run_stage("runs", lambda: main(sys.argv[1:]))
