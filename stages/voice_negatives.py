"""Stage voice_negatives: the base model's answers to a seeded sample of training questions.

    python stages/voice_negatives.py       # reads params.yaml (eval.voice.negatives, eval.*)

The voice score (stage voice) learns the author's style against these: other text written for
the same kind of questions, from the train split only, generated exactly as the evaluate stage
generates (eval.max_tokens, eval.temperature, eval.repetition_penalty). eval.voice.negatives
bounds the sample, so the default `make repro` keeps its time. Writes
data/voice/negatives.jsonl (the evaluate stage's prediction format).
"""
import argparse
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas  # before mlx: a fast BLAS on Linux
from voicetune.core import kernels
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params
from voicetune.evaluate.answers import answer_questions
from voicetune.evaluate.questions import read_test
from voicetune.data.qa import seeded_order
from voicetune.models.fusion import load_float32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--train", default="data/processed/train.jsonl")
    ap.add_argument("--out", default="data/voice/negatives.jsonl")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p = params["eval"]
    blas.check(verbose=False)
    kernels.enable(params["kernels"]["fast_cpu"])

    rows = read_test(args.train, missing="run `dvc repro prepare` first")
    # the project's seeded draw (a prefix of seeded_order), in file order
    picked = [rows[i] for i in sorted(seeded_order(len(rows), p["seed"])[:p["voice"]["negatives"]])]
    model, tokenizer, _ = load_float32(Path(args.model))
    records = answer_questions(model, tokenizer, picked, p, desc="voice negatives (base)")
    write_jsonl(args.out, records)
    cut = sum(r["finish_reason"] == "length" for r in records)
    print(f"voice negatives: {len(records)} base answers to training questions ({cut} hit "
          f"{p['max_tokens']} tokens) -> {args.out}")
    return 0


if __name__ == "__main__":
    run_stage("voice_negatives", main)
