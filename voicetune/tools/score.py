"""Re-score predictions JSONL files (fields: prompt, reference, prediction).

    python -m voicetune.tools.score data/eval/base.jsonl data/eval/lora.jsonl [--json]

With two or more files, the later ones are also compared with the first, question by
question, with a seeded 95% bootstrap confidence interval. The files must hold the same
questions in the same order (``question``, else ``prompt``): pairing answers to different
questions would compare nothing, so the first difference stops the comparison. Each file is
named by its stem, or by as much of its path as tells it apart from the others
(``run1/lora``, ``run2/lora``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from voicetune.evaluate.metrics import compare, read_predictions, score


class PairingError(ValueError):
    pass


def run_names(paths: list[Path]) -> list[str]:
    """The shortest path tails that tell the files apart: ``lora`` for data/eval/lora.jsonl,
    ``a/lora`` and ``b/lora`` for a/lora.jsonl and b/lora.jsonl (and ``_predictions`` cut)."""
    parts = [[*p.parts[:-1], p.stem.removesuffix("_predictions")] for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{i + 1}" for i, name in enumerate(names)]  # one file given twice


def check_same_questions(path: Path, rows: list[dict], first_path: Path, first: list[dict]) -> None:
    """Refuse to pair ``rows`` with ``first`` unless they answer the same questions in order."""
    if len(rows) != len(first):
        raise PairingError(f"{path} has {len(rows)} answers, {first_path} has {len(first)}: "
                           "score files of the same questions")
    for i, (row, ref) in enumerate(zip(rows, first)):
        key = "question" if "question" in row or "question" in ref else "prompt"
        if row.get(key) != ref.get(key):
            raise PairingError(f"{path}:{i + 1}: {key} {row.get(key)!r} differs from {first_path}:{i + 1} "
                               f"({ref.get(key)!r}): the files must hold the same questions in the "
                               "same order")


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
    results, per_question, first_file = {}, {}, None
    for path, name in zip(args.files, run_names(args.files)):
        try:
            rows = read_predictions(path)
            first_file = first_file or (path, rows)
            check_same_questions(path, rows, *first_file)
        except (OSError, ValueError) as err:
            print(f"score: {err}", file=sys.stderr)
            return 2
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
        relative = (f"{100 * c['relative_improvement']:+.1f}%" if c["relative_improvement"] is not None
                    else f"relative change n/a ({first} mean is 0)")
        print(f"\n{name} (word overlap): {relative}, mean difference "
              f"{c['mean_difference']:+.4f} [95% CI {c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}], "
              f"wins/ties/losses {c['wins']}/{c['ties']}/{c['losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
