"""Stage pairs: preference pairs (chosen vs rejected) for the preference stage.

    python stages/pairs.py          # reads params.yaml (preference.*, eval.repetition_penalty/batch_size)

Self-play: each sampled training question's author answer (chosen) against the SFT LoRA's
(models/base + models/adapters) own greedy answer (rejected), decoded as evaluate@lora decodes;
plus the decisive arena votes for the current adapter (its md5 in dvc.lock), test and held-out
questions left out, from the votes the pairs_votes stage passes on (data/pairs_votes.json: none
unless arena is among preference.sources). Writes data/pairs/{train,valid}.jsonl (mlx-lm-lora's
DPO format) and metrics/pairs.json; greedy, so two runs give the same bytes.
"""
import argparse
import sys
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas  # before mlx: a fast BLAS on Linux
from voicetune.core import kernels
from voicetune.data import pairs
from voicetune.core.files import atomic_dir, write_json_atomic
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params

from tqdm import tqdm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/processed", help="the prepare stage's splits")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--adapters", default="models/adapters")
    ap.add_argument("--votes", default="data/pairs_votes.json", help="the pairs_votes stage's output")
    ap.add_argument("--out", default="data/pairs")
    ap.add_argument("--metrics", default="metrics/pairs.json")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p, eval_p = params["preference"], params["eval"]
    blas.check(verbose=False)  # warns loudly when MLX runs on the slow reference BLAS
    fast_cpu = kernels.enable(params["kernels"]["fast_cpu"])
    data = Path(args.data)
    rows = pairs.read_exchanges(data / "train.jsonl")
    heldout = pairs.heldout([data / "valid.jsonl", data / "test.jsonl"])

    votes, identity = [], {}
    if "arena" in p["sources"]:
        votes = pairs.read_votes_used(args.votes)
        identity, warning = pairs.current_weights(votes, ".")
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr)
    load_model = pairs.model_loader(args.model, args.adapters)

    questions = len(pairs.sample(len(rows), p["pairs"], p["seed"])) if "self" in p["sources"] else 0
    with tqdm(total=questions, desc="generate (rejected)", unit="answer", disable=not questions) as bar:
        train, valid, metrics = pairs.build(p, eval_p, rows, heldout, votes, identity, load_model,
                                            progress=bar.update)
    metrics["fast_cpu_kernels"] = fast_cpu
    # both outputs are replaced at the very end: a failure above keeps the last good pair
    with atomic_dir(args.out) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "valid.jsonl", valid)
    write_json_atomic(args.metrics, metrics)
    print(f"pairs: {pairs.summary(metrics)}")
    return 0


if __name__ == "__main__":
    run_stage("pairs", main)
