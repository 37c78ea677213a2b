"""Benchmark: batched generation vs one question at a time, same model, same questions.

    python -m voicetune.bench_generation [--model models/base] [--questions 16] [--max-tokens 64]

Runs both ways alternately (--repeats times) and prints median wall times, tokens/s and
the speed-up ratio; also whether the greedy answers agree.
"""
from __future__ import annotations

import argparse
import json
import statistics

from . import blas
from .fusion import load_float32
from .generation import generate_batched, generate_sequential, prompt_tokens, timed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--adapters", default=None)
    ap.add_argument("--test", default="data/processed/test.jsonl")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repetition-penalty", type=float, default=1.2, help="as eval.repetition_penalty")
    args = ap.parse_args(argv)
    blas.check()
    model, tokenizer, _ = load_float32(args.model, args.adapters)
    rows = [json.loads(line) for line in open(args.test, encoding="utf-8")][: args.questions]
    prompts = [prompt_tokens(tokenizer, r["messages"]) for r in rows]
    generate_batched(model, tokenizer, prompts[:2], 4)  # warm-up
    times = {"sequential": [], "batched": []}
    for _ in range(args.repeats):
        seq, t = timed(generate_sequential, model, tokenizer, prompts, args.max_tokens,
                       repetition_penalty=args.repetition_penalty)
        times["sequential"].append(t)
        bat, t = timed(generate_batched, model, tokenizer, prompts, args.max_tokens,
                       batch_size=args.batch_size, repetition_penalty=args.repetition_penalty)
        times["batched"].append(t)
    tokens = {"sequential": sum(a["tokens"] for a in seq), "batched": sum(a["tokens"] for a in bat)}
    for way in times:
        median = statistics.median(times[way])
        print(f"{way:>10}: {median:7.1f} s median of {args.repeats}, {tokens[way] / median:6.1f} tokens/s")
    ratio = statistics.median(times["sequential"]) / statistics.median(times["batched"])
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(seq, bat))
    print(f"batched is {ratio:.2f}x one-at-a-time ({len(prompts)} questions, <= {args.max_tokens} "
          f"tokens each); greedy answers identical: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
