"""Stage arena: data/arena/votes.jsonl -> metrics/arena.json, metrics/plots/arena.png.

    python stages/arena.py                 # reads params.yaml (arena section)

The arena page (make arena) appends the votes; this turns them into win rates and
Bradley–Terry ratings with bootstrap intervals (voicetune/ratings.py, the page's own table).
By default only the votes for the current adapter count: its identity is the md5 that dvc.lock
records for the train stage's models/adapters, the same one the page writes into each vote.
No votes at all is no error: a fresh clone gets a table of nulls and a "no votes yet" plot.
"""
import argparse
import sys
from pathlib import Path

from voicetune.errors import run_stage
from voicetune import ratings
from voicetune.files import write_bytes_atomic, write_json_atomic
from voicetune.params import load_params
from voicetune.votes import VOTES, adapter_identity, read_votes

METRICS = Path("metrics/arena.json")
PLOT = Path("metrics/plots/arena.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    p = load_params(args.params)["arena"]  # validates all of params.yaml, before any work

    votes, warnings = read_votes(VOTES)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    adapter = None
    if p["adapter"] == "current":
        # dvc.lock is no dep of this stage: models/adapters is, and the train entry read here
        # changes exactly when models/adapters does (see NOT_DEPS in tests/test_dvc_graph.py)
        adapter = adapter_identity(".")
        if adapter is None and votes:
            print("WARNING: dvc.lock records no trained models/adapters: counting every vote "
                  "(run the train stage, or set arena.adapter: all)", file=sys.stderr)
    result = ratings.compute_ratings(votes, adapter, models=p["models"], rounds=p["rounds"],
                                     seed=p["seed"], skipped_lines=len(warnings))
    png = ratings.plot_png(result)
    # both computed before either is replaced: a failure keeps the last good pair
    write_json_atomic(METRICS, result)
    write_bytes_atomic(PLOT, png)

    if not votes:
        print("arena: no votes yet: run make arena")
    else:
        print(f"arena: {ratings.summary_note(result)}")
        for line in ratings.markdown(result)[2:]:
            print(line)
    print(f"arena: {METRICS}, {PLOT}")


if __name__ == "__main__":
    run_stage("arena", main)
