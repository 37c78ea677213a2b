"""Stage prepare: the Q&A source and rewrite pairs -> data/processed/{train,valid,test}.jsonl + metrics/data.json.

    python stages/prepare.py               # reads params.yaml (data, train sections)

Every sample is [persona system prompt, question, answer] in mlx-lm's chat format, checked
against the base model's own chat template (models/base). data.task picks the samples: the
Q&A pairs of data.source (qa), the rewrite stage's pairs (rewrite: the instruction and a
plain draft, then the author's original; each row marked "task": "rewrite"), or both.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from voicetune.core.errors import UserError, run_stage
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
    ap.add_argument("--rewrites", default="data/rewrite/pairs.jsonl",
                    help="the rewrite stage's pairs (read when data.task is rewrite or both)")
    args = ap.parse_args()
    params = load_params(args.params)
    p, t = params["data"], params["train"]

    tokenizer = prepare.load_base_tokenizer(args.model)
    profile = profile_template(tokenizer)
    task = p["task"]
    empty = {"train": [], "valid": [], "test": []}
    splits, source, duplicates, conflicts, total = empty, {}, [], [], 0
    if task in ("qa", "both"):
        with tempfile.TemporaryDirectory() as download_dir:
            exchanges, source = prepare.read_source(p, Path(download_dir), forbidden=profile.specials)
        exchanges, duplicates, conflicts = qa.drop_duplicate_questions(exchanges)
        warn_some(duplicates, "duplicate questions dropped")
        warn_some(conflicts, "questions with a conflicting answer dropped")
        total = len(exchanges)
        splits = qa.split(exchanges, p["seed"], p["valid_ratio"], p["test_ratio"],
                          by=p.get("split_by", "conversation"))
    if task in ("rewrite", "both"):
        rewrites = prepare.read_rewrites(args.rewrites, forbidden=profile.specials)
        if not rewrites:
            message = (f"{args.rewrites} holds no rewrite pair (see metrics/rewrite.json for why "
                       "every paraphrase was rejected): loosen rewrite.* or set rewrite.endpoint "
                       "to a stronger generator")
            if task == "rewrite":
                raise UserError(message + ", or set data.task to qa")
            print(f"WARNING: data.task is both, but {message}; training on Q&A only", file=sys.stderr)
        total += len(rewrites)
        source = {**source, "rewrite": {"path": args.rewrites, "pairs": len(rewrites)}}
        splits = prepare.mix(splits, prepare.split_rewrites(rewrites, p), p["rewrite_ratio"], p["seed"])
    qa.check_split_sizes(splits, t["batch_size"])
    # the schema ensures system_prompt is a non-empty string
    rows, lengths = prepare.samples(splits, p["system_prompt"], tokenizer, profile)
    for warning in qa.check_answer_room(lengths, t["max_seq_length"]):
        print(f"warning: {warning}", file=sys.stderr)

    with atomic_dir(args.out) as out:
        for name, split_rows in rows.items():
            write_jsonl(out / f"{name}.jsonl", split_rows)
    summary = prepare.summary(source, rows, lengths, total, len(duplicates), len(conflicts), t)
    summary = {"task": task, "rewrite_ratio": p["rewrite_ratio"], **summary}
    write_json_atomic(args.metrics, summary)

    tok, steps_per_epoch = summary["tokens"], summary["steps_per_epoch"]
    read = ", ".join(([f"{source['hub_dataset']}@{source['commit_sha']}"] if "hub_dataset" in source
                      else source.get("files", []))
                     + ([f"{source['rewrite']['path']} (rewrite)"] if "rewrite" in source else []))
    print(f"prepared {summary['total']} samples from {read}"
          f" -> train {len(rows['train'])} / valid {len(rows['valid'])} / test {len(rows['test'])}"
          f" (seed {p['seed']}, split by {p.get('split_by', 'conversation')}; task {task})")
    if task != "qa":
        counts = summary["tasks"]
        print("  rewrite samples: " + " / ".join(f"{name} {counts[name]['rewrite']}" for name in counts))
    length = f"{t['iters']} iters = {summary['epochs']} epochs" if t.get("epochs") is None \
        else f"{t['epochs']} epochs = {t['epochs'] * steps_per_epoch} iters"
    print(f"  {steps_per_epoch} steps per epoch at batch {t['batch_size']}: {length}")
    print(f"  tokens per sample: p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, max {tok['max']}; "
          f"{tok['over_max_seq_length']} over max_seq_length {t['max_seq_length']}")
    if duplicates or conflicts:
        print(f"warning: {len(duplicates) + len(conflicts)} duplicate questions dropped in all, "
              f"{len(conflicts)} of them with a conflicting answer", file=sys.stderr)


if __name__ == "__main__":
    run_stage("prepare", main)
