"""Stage prepare: the Q&A source -> data/processed/{train,valid,test}.jsonl + metrics/data.json.

    python stages/prepare.py               # reads params.yaml (data, train sections)

Every sample is [persona system prompt, question, answer] in mlx-lm's chat format, checked
against the base model's own chat template (models/base).
"""
import argparse
import math
import sys
import tempfile
from pathlib import Path

from mlx_lm.utils import load_tokenizer

from voicetune.core.errors import UserError, run_stage
from voicetune.data import qa
from voicetune.models.chat_template import ChatTemplateError, check_rendered, profile_template, render
from voicetune.core.files import atomic_dir, write_json_atomic
from voicetune.core.jsonl import write_jsonl
from voicetune.core.params import load_params


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

    if not (Path(args.model) / "tokenizer_config.json").is_file():
        # else mlx-lm takes the path for a hub repo id and fails with a traceback
        raise UserError(f"{args.model}: no model folder (no tokenizer_config.json); build it with "
                        "`dvc repro base_model`, or pass --model a Hugging Face-format folder")
    tokenizer = load_tokenizer(Path(args.model))
    profile = profile_template(tokenizer)
    system_prompt = p["system_prompt"]  # the schema ensures a non-empty string

    with tempfile.TemporaryDirectory() as download_dir:
        if p.get("hub_dataset"):
            files, source = qa.download_hub_dataset(p["hub_dataset"], p.get("hub_revision"),
                                                         Path(download_dir))
        else:
            files = qa.source_files(p["source"])
            source = {"path": str(p["source"]), "files": [str(f) for f in files]}
        exchanges = qa.load_exchanges(files, forbidden=profile.specials)
    exchanges, duplicates, conflicts = qa.drop_duplicate_questions(exchanges)
    warn_some(duplicates, "duplicate questions dropped")
    warn_some(conflicts, "questions with a conflicting answer dropped")

    splits = qa.split(exchanges, p["seed"], p["valid_ratio"], p["test_ratio"],
                           by=p.get("split_by", "conversation"))
    qa.check_split_sizes(splits, t["batch_size"])

    rows, lengths, problems = {}, {}, []
    for name, samples in splits.items():
        rows[name] = [{"messages": qa.to_messages(ex, system_prompt)} for ex in samples]
        lengths[name] = []
        for ex, row in zip(samples, rows[name]):
            why = check_rendered(render(tokenizer, row["messages"]), row["messages"], profile)
            if why:
                problems.append(f"{ex.where}: {why}")
            prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True,
                                                   return_dict=False)  # as mlx-lm masks it
            total = tokenizer.apply_chat_template(row["messages"], return_dict=False)
            lengths[name].append(qa.Length(ex.where, len(prompt), len(total)))
    if problems:
        raise ChatTemplateError(str(qa.DataError(problems, header="chat template check failed")))
    for warning in qa.check_answer_room(lengths, t["max_seq_length"]):
        print(f"warning: {warning}", file=sys.stderr)

    with atomic_dir(args.out) as out:
        for name, split_rows in rows.items():
            write_jsonl(out / f"{name}.jsonl", split_rows)

    # training takes every sample once per epoch, the last batch of an epoch maybe partial
    steps_per_epoch = math.ceil(len(rows["train"]) / t["batch_size"])
    all_lengths = [x.total for split_lengths in lengths.values() for x in split_lengths]
    summary = {
        "source": source,  # what was read: the path(s), or the hub dataset at its commit sha
        "samples": {name: len(r) for name, r in rows.items()},
        "total": len(exchanges),
        "duplicates_dropped": len(duplicates) + len(conflicts),  # conflicts included
        "conflicting_answers": len(conflicts),
        "steps_per_epoch": steps_per_epoch,
        "epochs": round(t["iters"] / steps_per_epoch, 2),
        "tokens": qa.length_summary(all_lengths, t["max_seq_length"]),
        "train_over_max_seq_length": sum(1 for x in lengths["train"] if x.total > t["max_seq_length"]),
    }
    write_json_atomic(args.metrics, summary)

    tok = summary["tokens"]
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
