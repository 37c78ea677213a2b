"""Stage arena: data/arena/votes.jsonl -> metrics/arena.json, metrics/plots/arena.png.

    python stages/arena.py                 # reads params.yaml (arena section)

The arena page (make arena) appends the votes; this turns them into win rates and
Bradley–Terry ratings with bootstrap intervals (voicetune/evaluate/ratings.py, the page's own table).
By default only the votes for the current weights count: every weight file behind a vote's two
models (base, SFT adapters, fused, preference adapters) must be the one dvc.lock records now,
as the page wrote it into the vote (voicetune.data.votes.weights_match).
No votes at all is no error: a fresh clone gets a table of nulls and a "no votes yet" plot.
Each rating is also given style-controlled (length and markdown as covariates), and, when the
voice stage has written metrics/voice.json (a dep), the table shows each model's voice score too.
"""
import argparse
import sys
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.evaluate import ratings
from voicetune.core.files import write_bytes_atomic, write_json_atomic
from voicetune.core.params import load_params
from voicetune.data.votes import VOTES, counted, read_votes, weights_identity

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
    # dvc.lock is no dep of this stage: the weights are, and their entries read here change
    # exactly when they do (see NOT_DEPS in tests/test_dvc_graph.py)
    identity = weights_identity(".") if p["adapter"] == "current" else None
    current = counted(p["adapter"], identity)
    if identity is not None and current is None and votes:
        print("WARNING: dvc.lock records none of the models' weights: counting every vote "
              "(run the pipeline, or set arena.adapter: all)", file=sys.stderr)
    result = ratings.compute_ratings(votes, current, weights=identity, models=p["models"],
                                     rounds=p["rounds"], seed=p["seed"], skipped_lines=len(warnings))
    voice = ratings.voice_models(ratings.VOICE)
    # the voice scores of the listed models ride along, so the report's table needs one file
    result["voice"] = None if voice is None else {
        m: {"score": voice[m].get("score"), "gap_closed": voice[m].get("gap_closed")}
        for m in result["models"] if m in voice}
    png = ratings.plot_png(result)
    # both computed before either is replaced: a failure keeps the last good pair
    write_json_atomic(METRICS, result)
    write_bytes_atomic(PLOT, png)

    if not votes:
        print("arena: no votes yet: run make arena")
    else:
        print(f"arena: {ratings.summary_note(result)}")
        for line in ratings.markdown(result, voice=result["voice"])[2:]:
            print(line)
    print(f"arena: {METRICS}, {PLOT}")


if __name__ == "__main__":
    run_stage("arena", main)
