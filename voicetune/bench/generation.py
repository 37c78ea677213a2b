"""Benchmark: batched generation vs one question at a time, same model, same questions.

    python -m voicetune.tools.bench_generation [--model models/base] [--questions 16] [--max-tokens 64]
    python -m voicetune.tools.bench_generation --chat [--questions 5]   # the chat's latency

Runs both ways alternately (--repeats times) and prints median wall times, tokens/s and
the speed-up ratio; also whether the greedy answers agree. With --chat: what a person
chatting sees, through the chat's own streaming path (base and lora sharing one copy of the
weights): seconds to the first shown text and tokens/s after it, medians over the questions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from voicetune.core import blas
from voicetune.models.fusion import load_float32
from voicetune.models.generation import generate_batched, generate_sequential, prompt_tokens, timed


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
    ap.add_argument("--chat", action="store_true", help="measure the chat's first-token latency "
                    "and tokens/s for base and lora instead (--model, --adapters default to models/)")
    args = ap.parse_args(argv)
    blas.check()
    if args.chat:
        return bench_chat(args.model, args.adapters or "models/adapters", args.test,
                          args.questions, args.max_tokens, args.repetition_penalty)
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


def bench_chat(base: str, adapters: str, test: str, questions: int, max_tokens: int,
               repetition_penalty: float | None) -> None:
    """First-token latency and tokens/s of chat answers, base and lora alternately."""
    from voicetune.serve.chat import Settings, stream_answer
    from voicetune.models.loader import ChatModels

    models = ChatModels(base, adapters, check=False, log=lambda _: None)
    models.prepare(["lora"])
    rows = [json.loads(line) for line in open(test, encoding="utf-8")][:questions]
    settings = Settings(max_tokens, 0.0, 0, repetition_penalty)
    stream_answer(*models.get("base"), rows[0]["messages"][:-1], Settings(4), lambda _: None)  # warm-up
    results = {"base": [], "lora": []}
    for row in rows:
        for name in results:
            model, tokenizer = models.get(name)
            shown = []
            start = time.perf_counter()
            answer = stream_answer(model, tokenizer, row["messages"][:-1], settings,
                                   lambda text: shown.append(time.perf_counter()) if text else None)
            end = time.perf_counter()
            first = shown[0] - start
            results[name].append((first, (answer["tokens"] - 1) / (end - shown[0]), answer["tokens"]))
    for name, runs in results.items():
        print(f"chat {name:>4}: first text after {statistics.median(r[0] for r in runs):.3f} s, then "
              f"{statistics.median(r[1] for r in runs):.1f} tokens/s (medians over {len(runs)} "
              f"questions, {statistics.median(r[2] for r in runs):.0f} tokens per answer, "
              f"greedy, <= {max_tokens} tokens)")
