"""Stage evaluate@<model>: answer every held-out question with one model and score it.

    python stages/evaluate.py --model base     # models/base
    python stages/evaluate.py --model lora     # models/base + models/adapters at run time
    python stages/evaluate.py --model fused    # models/fused
    python stages/evaluate.py --model dpo      # models/fused + models/preference_adapters

Writes data/eval/<model>.jsonl (prompt, question, reference, prediction, tokens,
finish_reason; task on the rewrite task's rows) and metrics/eval_<model>.json: the Q&A
figures on the Q&A questions, and under "rewrite" the rewrites' (chrF, ROUGE-L, content kept,
length) against the held-out posts' originals. Greedy by default; eval.temperature > 0
samples with eval.seed, so two runs give the same answers either way.
"""
import argparse
import time
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas  # before mlx: a fast BLAS on Linux
from voicetune.core import kernels
from voicetune.core.environment import versions
from voicetune.core.files import write_json_atomic, write_text_atomic
from voicetune.models.fusion import load_float32
from voicetune.core.jsonl import dumps_jsonl
from voicetune.data.rewrite import by_task, task_of
from voicetune.evaluate import rewrites
from voicetune.evaluate.metrics import score
from voicetune.evaluate.perplexity import reference_scores
from voicetune.evaluate.answers import answer_questions
from voicetune.evaluate.questions import read_test
from voicetune.core.params import load_params
from voicetune.models.registry import MODELS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--test", default="data/processed/test.jsonl")
    ap.add_argument("--out", default=None, help="predictions JSONL (default data/eval/<model>.jsonl)")
    ap.add_argument("--metrics", default=None, help="default metrics/eval_<model>.json")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p = params["eval"]
    blas.check(verbose=False)  # warns loudly when MLX runs on the slow reference BLAS
    fast_cpu = kernels.enable(params["kernels"]["fast_cpu"])
    out = Path(args.out or f"data/eval/{args.model}.jsonl")
    metrics_path = Path(args.metrics or f"metrics/eval_{args.model}.json")

    chosen = MODELS[args.model]
    model, tokenizer, _ = load_float32(chosen.weights, chosen.adapters)
    rows = read_test(args.test, missing="run `dvc repro prepare` first")
    if p.get("limit"):  # the first N questions of each task
        rows = [row for task_rows in by_task(rows).values() for row in task_rows[: p["limit"]]]
    start = time.perf_counter()
    records = answer_questions(model, tokenizer, rows, p, desc=f"generate ({args.model})")
    seconds = time.perf_counter() - start

    tasks = by_task(records)
    qa_rows = [row for row in rows if task_of(row) == "qa"]
    summary = {}
    if qa_rows:  # the Q&A figures as they always were: on the Q&A questions only
        summary, _ = score(tasks["qa"])
        summary.update(reference_scores(model, tokenizer, qa_rows))
    summary.update({
        "temperature": p["temperature"], "seed": p["seed"] if p["temperature"] > 0 else None,
        "repetition_penalty": p.get("repetition_penalty"),
        "max_tokens": p["max_tokens"], "generated_tokens": sum(r["tokens"] for r in records),
        "fast_cpu_kernels": fast_cpu,
        "environment": versions(),  # `dvc metrics diff` shows a library change beside its effect
    })  # no timings here: two runs must give identical metrics (speed: python -m voicetune.tools.bench_generation)
    if "rewrite" in tasks:
        summary["rewrite"], _ = rewrites.score(tasks["rewrite"])
        summary["rewrite"].update(max_tokens=p["rewrite_max_tokens"], **reference_scores(
            model, tokenizer, [row for row in rows if task_of(row) == "rewrite"]))
    # both outputs are replaced at the very end: a failure above keeps the last good pair
    write_text_atomic(out, dumps_jsonl(records))
    write_json_atomic(metrics_path, summary)
    if qa_rows:
        print(f"{args.model}: word overlap {summary['word_overlap']['mean']:.4f} ± "
              f"{summary['word_overlap']['std']:.4f}, ROUGE-L {summary['rouge_l']['mean']:.4f}, "
              f"answers {summary['prediction_chars']['mean']:.0f} ± {summary['prediction_chars']['std']:.0f} "
              f"chars (references {summary['reference_chars']['mean']:.0f}), reference perplexity "
              f"{summary['reference_perplexity']:.2f}; {summary['hit_token_limit']}/{len(qa_rows)} hit "
              f"{p['max_tokens']} tokens")
    if "rewrite" in summary:
        rw = summary["rewrite"]
        print(f"{args.model} rewrites ({rw['n']}): chrF {rw['chrf']['mean']:.1f}, ROUGE-L "
              f"{rw['rouge_l']['mean']:.4f} against the originals; content kept "
              f"{rw['content_kept']['mean']:.2f}, length {rw['length_ratio']['mean']:.2f}x the "
              f"original's; {rw['hit_token_limit']}/{rw['n']} hit {p['rewrite_max_tokens']} tokens")
    print(f"{args.model}: {summary['generated_tokens'] / seconds:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    run_stage("evaluate", main)
