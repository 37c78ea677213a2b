"""Stage report: data/eval/*.jsonl + metrics -> metrics/report.md, metrics/compare.json, plots.

The arena's ratings (metrics/arena.json, from the arena stage) get a section of their own.

    python stages/report.py                # reads params.yaml (eval section)
"""
import argparse
import json
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.evaluate import report
from voicetune.core.files import atomic_files, write_json_atomic, write_text_atomic
from voicetune.core.jsonl import read_jsonl
from voicetune.evaluate.metrics import read_predictions
from voicetune.core.params import load_params
from voicetune.models.registry import NAMES


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    args = ap.parse_args()
    p = load_params(args.params)["eval"]

    runs = {name: read_predictions(Path(f"data/eval/{name}.jsonl")) for name in args.models}
    summaries = {name: read_json(Path(f"metrics/eval_{name}.json")) for name in args.models}
    values = report.per_question(runs)
    voice = read_json(Path("metrics/voice.json"))
    if voice and Path("data/voice/scores.jsonl").exists():
        scores = read_jsonl(Path("data/voice/scores.jsonl"))
        for name in values:
            if all(name in row for row in scores) and len(scores) == len(runs[name]):
                values[name]["voice_score"] = [row[name] for row in scores]
    comps = report.comparisons(values, seed=p["seed"])
    # everything is computed before any output is replaced: a failure keeps the last report.
    # Only this stage's plots are replaced: metrics/plots also holds the arena stage's plot.
    with atomic_files("metrics/plots") as plot_dir:
        plots = report.plot_all(values, runs, Path("dvclive/train"), plot_dir, voice=voice)
        text = report.markdown(summaries, comps, read_json(Path("metrics/train.json")),
                               read_json(Path("metrics/fuse.json")), runs, p["report_examples"],
                               p["seed"], [f"plots/{f.name}" for f in plots],
                               arena=read_json(Path("metrics/arena.json")),
                               preference=read_json(Path("metrics/preference.json")),
                               pairs=read_json(Path("metrics/pairs.json")), voice=voice,
                               judge=read_json(Path("metrics/judge.json")))
    write_json_atomic("metrics/compare.json", comps)
    write_text_atomic("metrics/report.md", text)
    for pair, metrics in comps.items():
        print(f"{pair}: word overlap {report.format_comparison(metrics['word_overlap'])}")
    print("report: metrics/report.md")


if __name__ == "__main__":
    run_stage("report", main)
