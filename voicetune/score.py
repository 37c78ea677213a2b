"""Re-score predictions JSONL files (fields: prompt, reference, prediction).

    python -m voicetune.score data/eval/base.jsonl data/eval/lora.jsonl [--json]

With two or more files, the later ones are also compared with the first, question by
question (same order), with a seeded 95% bootstrap confidence interval.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .metrics import compare, read_predictions, score


def table(results: dict[str, dict]) -> str:
    lines = ["| run | mean overlap | std | min | max | ROUGE-L | prediction chars | reference chars |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        o, p, r = s["word_overlap"], s["prediction_chars"], s["reference_chars"]
        rouge = f"{s['rouge_l']['mean']:.4f}" if "rouge_l" in s else "-"
        lines.append(f"| {name} | {o['mean']:.4f} | {o['std']:.4f} | {o['min']:.4f} | {o['max']:.4f} "
                     f"| {rouge} | {p['mean']:.1f} ± {p['std']:.1f} | {r['mean']:.1f} ± {r['std']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--no-rouge", action="store_true")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    results, per_question = {}, {}
    for path in args.files:
        try:
            rows = read_predictions(path)
        except (OSError, ValueError) as err:
            print(f"score: {err}", file=sys.stderr)
            return 2
        name = path.stem.removesuffix("_predictions")
        results[name], per_question[name] = score(rows, with_rouge=not args.no_rouge)
    first = next(iter(results))
    comparisons = {f"{name}_vs_{first}": compare(per_question[name]["word_overlap"],
                                                per_question[first]["word_overlap"], args.seed)
                   for name in list(results)[1:]}
    if args.json:
        print(json.dumps({"runs": results, "word_overlap_comparisons": comparisons}, indent=2))
        return 0
    print(table(results))
    for name, c in comparisons.items():
        print(f"\n{name} (word overlap): {100 * c['relative_improvement']:+.1f}%, mean difference "
              f"{c['mean_difference']:+.4f} [95% CI {c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}], "
              f"wins/ties/losses {c['wins']}/{c['ties']}/{c['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
