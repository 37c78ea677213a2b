"""Stage pairs_votes: the arena votes that the pairs stage reads, and only when it reads them.

    python stages/pairs_votes.py   # reads params.yaml (preference.sources)

DVC has no dependency that holds for some params only; this stage is that condition. With
arena in preference.sources it copies every vote of data/arena/votes.jsonl into
data/pairs_votes.json, the pairs stage's dependency; without, it writes no vote and reads
none. A new vote reruns this stage (a second), and the pairs stage (its self-play generation:
~30 s here) only when the votes are among its sources.
"""
import argparse
import sys

from voicetune.core.errors import run_stage
from voicetune.core.files import write_json_atomic
from voicetune.core.params import load_params
from voicetune.data.vote_pairs import votes_used
from voicetune.data.votes import VOTES

OUT = "data/pairs_votes.json"  # voicetune.data.pairs.read_votes_used reads it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--votes", default=str(VOTES))
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    sources = load_params(args.params)["preference"]["sources"]  # validates all of params.yaml
    used, warnings = votes_used(sources, args.votes)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if used["votes_file"] is not None:
        n = len(used["votes"])
        print(f"pairs_votes: {n} vote{'s' * (n != 1)} of {args.votes} for the pairs stage")
    else:
        print(f"pairs_votes: none; preference.sources is [{', '.join(sources)}], without arena")
    write_json_atomic(args.out, used)
    return 0


if __name__ == "__main__":
    run_stage("pairs_votes", main)
