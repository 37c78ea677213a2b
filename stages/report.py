"""Stage report: data/eval/*.jsonl + metrics -> metrics/report.md, metrics/compare.json, plots.

The arena's ratings (metrics/arena.json, from the arena stage) get a section of their own, and so
do the rewrite task's figures (the predictions rows marked "task": "rewrite").

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
from voicetune.data.rewrite import by_task
from voicetune.evaluate import rewrites
from voicetune.models.registry import NAMES


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    args = ap.parse_args()
    p = load_params(args.params)["eval"]

    everything = {name: by_task(read_predictions(Path(f"data/eval/{name}.jsonl"))) for name in args.models}
    runs = {name: tasks.get("qa", []) for name, tasks in everything.items()}
    rewrite_runs = {name: tasks["rewrite"] for name, tasks in everything.items() if "rewrite" in tasks}
    summaries = {name: read_json(Path(f"metrics/eval_{name}.json")) for name in args.models}
    values = report.per_question(runs) if any(runs.values()) else {}  # none for data.task rewrite
    rewrite_values = {name: rewrites.per_rewrite(rows) for name, rows in rewrite_runs.items()}
    voice = read_json(Path("metrics/voice.json"))
    if voice and Path("data/voice/scores.jsonl").exists():
        scores = by_task(read_jsonl(Path("data/voice/scores.jsonl")))
        for task, task_values, task_runs in (("qa", values, runs), ("rewrite", rewrite_values, rewrite_runs)):
            rows = scores.get(task, [])
            for name in task_values:
                if rows and all(name in row for row in rows) and len(rows) == len(task_runs[name]):
                    task_values[name]["voice_score"] = [row[name] for row in rows]
    comps = report.comparisons(values, seed=p["seed"])
    for pair, metrics in report.rewrite_comparisons(rewrite_values, seed=p["seed"]).items():
        comps.setdefault(pair, {})["rewrite"] = metrics
    # everything is computed before any output is replaced: a failure keeps the last report.
    # Only this stage's plots are replaced: metrics/plots also holds the arena stage's plot.
    with atomic_files("metrics/plots") as plot_dir:
        plots = report.plot_all(values, runs, Path("dvclive/train"), plot_dir, voice=voice,
                                rewrite_values=rewrite_values)
        text = report.markdown(summaries, comps, read_json(Path("metrics/train.json")),
                               read_json(Path("metrics/fuse.json")), runs, p["report_examples"],
                               p["seed"], [f"plots/{f.name}" for f in plots],
                               arena=read_json(Path("metrics/arena.json")),
                               preference=read_json(Path("metrics/preference.json")),
                               pairs=read_json(Path("metrics/pairs.json")), voice=voice,
                               judge=read_json(Path("metrics/judge.json")), rewrite_runs=rewrite_runs)
    write_json_atomic("metrics/compare.json", comps)
    write_text_atomic("metrics/report.md", text)
    for pair, metrics in comps.items():
        if "word_overlap" in metrics:
            print(f"{pair}: word overlap {report.format_comparison(metrics['word_overlap'])}")
        if "rewrite" in metrics:
            print(f"{pair}: rewrites' chrF {report.format_comparison(metrics['rewrite']['chrf'], pct=False)}")
    print("report: metrics/report.md")


if __name__ == "__main__":
    run_stage("report", main)
