"""Stage judge: "which of these two answers did the author write?", asked of a judge model.

    python stages/judge.py        # reads params.yaml (eval.judge.*, model.source, kernels.fast_cpu)

Shows the judge (the base model in-process, greedy, or eval.judge.endpoint) each model's test
answer against base's and against the author's, in both orders, with a few of the author's
train answers as examples, and writes data/judge/verdicts.jsonl (both replies, their letters
and the verdict of every contest and question) and metrics/judge.json (win rates raw and
length-controlled, position bias, consistency). Replies are cached in cache/judge/.
eval.judge.run off, or auto with the embedded 135M model as the judge, writes a metrics file
that says why it did not run, and no verdicts.
"""
import argparse

from voicetune.core.errors import run_stage
from voicetune.core.files import write_json_atomic, write_text_atomic
from voicetune.core.jsonl import dumps_jsonl
from voicetune.core.params import load_params
from voicetune.evaluate import judge
from voicetune.evaluate.questions import read_test
from voicetune.models import generators

from tqdm import tqdm  # noqa: E402

ROUNDS = 1000  # bootstrap rounds of the length-controlled fit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base", help="the in-process judge")
    ap.add_argument("--eval-dir", default="data/eval", help="<model>.jsonl: each model's answers")
    ap.add_argument("--train", default="data/processed/train.jsonl", help="the author's examples")
    ap.add_argument("--cache", default="cache/judge", help="the judge's replies (not a DVC output)")
    ap.add_argument("--out", default="data/judge/verdicts.jsonl")
    ap.add_argument("--metrics", default="metrics/judge.json")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p = params["eval"]["judge"]

    if reason := judge.why_off(p, params["model"]["source"]):
        write_text_atomic(args.out, "")
        write_json_atomic(args.metrics, {"run": "off", "reason": reason})
        print(f"judge: off: {reason}")
        return 0

    questions, answers = judge.read_answers(args.eval_dir, p["limit"])
    examples = judge.example_answers(read_test(args.train, missing="run `dvc repro prepare` first"),
                                     p["examples"], p["seed"])
    # greedy: one letter, the most likely one
    generator = generators.stage_generator({**p, "temperature": 0.0, "repetition_penalty": None},
                                           args.model, "eval.judge", params["kernels"]["fast_cpu"])
    pairs = len(judge.contests([n for n in answers if n != judge.AUTHOR])) * len(questions)
    with tqdm(total=2 * pairs, desc="judge", unit="reply") as bar:
        records, metrics = judge.judge(questions, answers, examples, generator, args.cache,
                                       progress=bar.update)
    metrics = {"run": "on", **metrics,
               "length_controlled": judge.length_controlled(records, answers, ROUNDS, p["seed"])}
    # both outputs are replaced at the very end: a failure above keeps the last good pair
    write_text_atomic(args.out, dumps_jsonl(records))
    write_json_atomic(args.metrics, metrics)

    for name, c in metrics["contests"].items():
        print(f"judge: {name}: win rate {c['win_rate']:.2f} [{c['win_rate_ci_low']:.2f}, "
              f"{c['win_rate_ci_high']:.2f}] (W/T/L {c['wins']}/{c['ties']}/{c['losses']})")
    for name, m in metrics["length_controlled"]["models"].items():
        if m["win_prob"] is not None:  # the anchor (base) has none
            print(f"judge: {name} beats base with P {m['win_prob']:.2f} raw, "
                  f"{m['controlled_win_prob']:.2f} with length and markdown held equal")
    print(f"judge: {metrics['calls']} replies ({metrics['cache_hits']} cached), position bias "
          f"{metrics['position_bias']} (0.5: none), consistency {metrics['consistency']}, "
          f"{metrics['unparseable']} unparseable")
    return 0


if __name__ == "__main__":
    run_stage("judge", main)
