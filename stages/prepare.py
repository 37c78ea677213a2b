"""Stage prepare: the Q&A source -> data/processed/{train,valid,test}.jsonl + metrics/data.json.

    python stages/prepare.py               # reads params.yaml (data, train sections)

Every sample is [persona system prompt, question, answer] in mlx-lm's chat format, checked
against the base model's own chat template (models/base).
"""
import argparse
import sys
import tempfile
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core.files import atomic_dir, write_json_atomic
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params
from voicetune.data import prepare, qa
from voicetune.models.chat_template import profile_template


def warn_some(notes: list[str], what: str, shown: int = 10) -> None:
    """The first ``shown`` notes as warnings on stderr, then how many more there are."""
    for note in notes[:shown]:
        print(f"warning: {note}", file=sys.stderr)
    if len(notes) > shown:
        print(f"warning: ... {len(notes) - shown} more {what}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--out", default="data/processed")
    ap.add_argument("--metrics", default="metrics/data.json")
    args = ap.parse_args()
    params = load_params(args.params)
    p, t = params["data"], params["train"]

    tokenizer = prepare.load_base_tokenizer(args.model)
    profile = profile_template(tokenizer)
    with tempfile.TemporaryDirectory() as download_dir:
        exchanges, source = prepare.read_source(p, Path(download_dir), forbidden=profile.specials)
    exchanges, duplicates, conflicts = qa.drop_duplicate_questions(exchanges)
    warn_some(duplicates, "duplicate questions dropped")
    warn_some(conflicts, "questions with a conflicting answer dropped")

    splits = qa.split(exchanges, p["seed"], p["valid_ratio"], p["test_ratio"],
                      by=p.get("split_by", "conversation"))
    qa.check_split_sizes(splits, t["batch_size"])
    # the schema ensures system_prompt is a non-empty string
    rows, lengths = prepare.samples(splits, p["system_prompt"], tokenizer, profile)
    for warning in qa.check_answer_room(lengths, t["max_seq_length"]):
        print(f"warning: {warning}", file=sys.stderr)

    with atomic_dir(args.out) as out:
        for name, split_rows in rows.items():
            write_jsonl(out / f"{name}.jsonl", split_rows)
    summary = prepare.summary(source, rows, lengths, len(exchanges), len(duplicates),
                              len(conflicts), t)
    write_json_atomic(args.metrics, summary)

    tok, steps_per_epoch = summary["tokens"], summary["steps_per_epoch"]
    read = (f"{source['hub_dataset']}@{source['commit_sha']}" if "hub_dataset" in source
            else ", ".join(source["files"]))
    print(f"prepared {summary['total']} samples from {read}"
          f" -> train {len(rows['train'])} / valid {len(rows['valid'])} / test {len(rows['test'])}"
          f" (seed {p['seed']}, split by {p.get('split_by', 'conversation')})")
    print(f"  {steps_per_epoch} steps per epoch at batch {t['batch_size']}: "
          f"{t['iters']} iters = {summary['epochs']} epochs")
    print(f"  tokens per sample: p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, max {tok['max']}; "
          f"{tok['over_max_seq_length']} over max_seq_length {t['max_seq_length']}")
    if duplicates or conflicts:
        print(f"warning: {len(duplicates) + len(conflicts)} duplicate questions dropped in all, "
              f"{len(conflicts)} of them with a conflicting answer", file=sys.stderr)


if __name__ == "__main__":
    run_stage("prepare", main)
