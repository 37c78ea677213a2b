"""Stage voice: does each model sound like the author? The voice score, calibrated.

    python stages/voice.py          # reads params.yaml (eval.voice.*, eval.seed)

Fits the authorship-verification model (voicetune/evaluate/voice.py) on the train split only:
the author's answers in data/processed/train.jsonl against the base model's answers to
sampled training questions (data/voice/negatives.jsonl). Then scores the author's own held-out
answers (the ceiling), the base model's (the floor) and every evaluated model's
(data/eval/<model>.jsonl). Writes metrics/voice.json (per model: mean P(author) with a 95% CI,
the share of the base -> author gap closed, the paired comparison with base and W/T/L; the
AUC that says whether the score is informative at all; the Q&A answers at the top level, the
rewrites under "rewrite", against the held-out posts' originals) and data/voice/scores.jsonl
(per question).
"""
import argparse
from pathlib import Path

from voicetune.core.errors import UserError, run_stage
from voicetune.core.files import write_json_atomic
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params
from voicetune.data.rewrite import by_task
from voicetune.evaluate.metrics import read_predictions
from voicetune.evaluate.questions import read_test
from voicetune.evaluate.rescore import check_same_questions
from voicetune.evaluate.voice import VoiceScorer, evaluate_voice, feature_aucs
from voicetune.models.registry import NAMES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--train", default="data/processed/train.jsonl")
    ap.add_argument("--negatives", default="data/voice/negatives.jsonl")
    ap.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--out", default="data/voice/scores.jsonl")
    ap.add_argument("--metrics", default="metrics/voice.json")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p, v = params["eval"], params["eval"]["voice"]
    if "base" not in args.models:
        raise UserError("the voice score is calibrated on the base model's answers: --models must include base")

    author = [row["messages"][-1]["content"] for row in
              read_test(args.train, missing="run `dvc repro prepare` first")]
    other = [row["prediction"] for row in read_predictions(Path(args.negatives))]
    runs = {name: read_predictions(Path(f"data/eval/{name}.jsonl")) for name in args.models}
    for name, rows in runs.items():  # refuses runs that answer different questions
        try:
            check_same_questions(Path(f"data/eval/{name}.jsonl"), rows, Path("data/eval/base.jsonl"),
                                 runs["base"])
        except ValueError as err:
            raise UserError(f"{err}; rerun the evaluate stages on the same test split") from None
    scorer = VoiceScorer(v["window_chars"], v["char_ngrams"], v["C"]).fit(author, other)
    tasks = {name: by_task(rows) for name, rows in runs.items()}
    qa = {name: t.get("qa", []) for name, t in tasks.items()}
    summary, records = {}, []
    if qa["base"]:  # none when data.task is rewrite
        summary, records = evaluate_voice(scorer, [r["reference"] for r in qa["base"]],
                                          {n: [r["prediction"] for r in rows] for n, rows in qa.items()},
                                          p["seed"])
        # which part of the voice the score reads: each feature set's own held-out AUC
        summary["auc_by_features"] = feature_aucs(
            author, other, [r["reference"] for r in qa["base"]], [r["prediction"] for r in qa["base"]],
            p["seed"], window_chars=v["window_chars"], char_ngrams=v["char_ngrams"], C=v["C"])
        for record, row in zip(records, qa["base"]):
            record["question"] = row.get("question")
    if "rewrite" in tasks["base"]:  # the rewrites, against the held-out posts' originals
        rewrites = {name: t["rewrite"] for name, t in tasks.items()}
        summary["rewrite"], scored = evaluate_voice(
            scorer, [r["reference"] for r in rewrites["base"]],
            {n: [r["prediction"] for r in rows] for n, rows in rewrites.items()}, p["seed"],
            kind="passages (the originals of the rewrites)")
        records += [{**record, "question": row["question"], "task": "rewrite"}
                    for record, row in zip(scored, rewrites["base"])]
    write_jsonl(args.out, records)
    write_json_atomic(args.metrics, summary)

    if "models" in summary:
        print(f"voice: {summary['verdict']}")
        print(f"voice: P(author) author {summary['ceiling']['score']:.3f} (ceiling), "
              + ", ".join(f"{n} {m['score']:.3f}" for n, m in summary["models"].items()))
        for name, m in summary["models"].items():
            if name != "base":
                g = m["gap_closed"]
                print(f"voice: {name} closes {100 * g['value']:.1f}% of the gap between base and the "
                      f"author (95% CI {100 * g['ci95_low']:.1f}% … {100 * g['ci95_high']:.1f}%)")
    if "rewrite" in summary:
        rw = summary["rewrite"]
        print(f"voice, rewrites ({rw['questions']}): {rw['verdict']}; P(author) author "
              f"{rw['ceiling']['score']:.3f}, " + ", ".join(f"{n} {m['score']:.3f}" for n, m in rw["models"].items()))
    return 0


if __name__ == "__main__":
    run_stage("voice", main)
