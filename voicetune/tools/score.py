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
from voicetune.evaluate.rescore import check_same_questions, run_names, table


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
