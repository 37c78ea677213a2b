"""The voice score of prediction files against an author's corpus (no pipeline run needed).

    python -m voicetune.tools.voice --author data/blog_qa.jsonl base.jsonl lora.jsonl [--json]

The first predictions file is the base model's (the floor); each file holds the same held-out
questions in the same order (``reference``, ``prediction``, and ``question`` or ``prompt``).
The author's corpus is any file prepare reads (JSONL/JSON, chat or question/answer rows);
every exchange of it whose question or answer is among the held-out ones is left out of the
fit. With --negatives (the base model's answers to training questions, in the predictions
format) the fit is the pipeline's; without, the questions are cross-fitted in two folds, each
scored by a model fit against the base answers of the other fold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.data.qa import load_exchanges, source_files
from voicetune.evaluate.metrics import read_predictions
from voicetune.evaluate.rescore import check_same_questions, run_names
from voicetune.evaluate.voice import (FEATURES, VoiceScorer, cross_fit, evaluate_voice,
                                      exclude_held_out, feature_aucs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="predictions JSONL, the base model's first")
    ap.add_argument("--author", required=True, help="the author's Q&A corpus (file or folder)")
    ap.add_argument("--negatives", type=Path, help="base answers to training questions (predictions format)")
    ap.add_argument("--window-chars", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print metrics/voice.json's format")
    args = ap.parse_args(argv)
    try:
        names = run_names(args.files)
        runs = {}
        for name, path in zip(names, args.files):
            runs[name] = read_predictions(path)
            check_same_questions(path, runs[name], args.files[0], runs[names[0]])
        author, dropped = exclude_held_out(load_exchanges(source_files(args.author)), runs[names[0]])
        references = [r["reference"] for r in runs[names[0]]]
        predictions = {("base" if n == names[0] else n): [r["prediction"] for r in rows]
                       for n, rows in runs.items()}
        if args.negatives:
            negatives = [r["prediction"] for r in read_predictions(args.negatives)]
            scorer = VoiceScorer(args.window_chars).fit(author, negatives)
            summary, _ = evaluate_voice(scorer, references, predictions, args.seed)
            summary["auc_by_features"] = feature_aucs(author, negatives, references, predictions["base"],
                                                      args.seed, window_chars=args.window_chars)
        else:
            summary, _ = cross_fit(author, references, predictions, args.seed, window_chars=args.window_chars)
            # which part of the voice the score reads: each feature set alone, cross-fitted the same way
            summary["auc_by_features"] = {
                features: cross_fit(author, references, {"base": predictions["base"]}, args.seed,
                                    window_chars=args.window_chars, features=features)[0]["auc_author_vs_base"]
                for features in FEATURES}
    except (OSError, ValueError, UserError) as err:
        print(f"voice: {err}", file=sys.stderr)
        return 2
    summary["author_exchanges_left_out"] = dropped
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{len(author)} of the author's answers fit ({dropped} left out: held-out questions); "
          f"{summary['questions']} held-out questions; {summary['verdict']}")
    if "auc_by_features" in summary:
        print("AUC by features (author vs base, held out): " + ", ".join(
            f"{name} {a['value']:.3f} ({a['ci95_low']:.3f} … {a['ci95_high']:.3f})"
            for name, a in summary["auc_by_features"].items()))
    print(f"length alone: AUC {summary['length_check']['auc_length_alone']:.3f}; the score on "
          f"first windows only: AUC {summary['length_check']['auc_first_window_only']:.3f}")
    c = summary["ceiling"]
    print(f"author (held-out, ceiling): P(author) {c['score']:.3f} (95% CI {c['ci95_low']:.3f} … {c['ci95_high']:.3f})")
    for name, m in summary["models"].items():
        g = m["gap_closed"]
        extra = "" if name == "base" else (
            f"; gap closed {100 * g['value']:.1f}% (95% CI {100 * g['ci95_low']:.1f}% … "
            f"{100 * g['ci95_high']:.1f}%), W/T/L vs base {m['vs_base']['wins']}/"
            f"{m['vs_base']['ties']}/{m['vs_base']['losses']}")
        print(f"{name}: P(author) {m['score']:.3f} (95% CI {m['ci95_low']:.3f} … {m['ci95_high']:.3f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
