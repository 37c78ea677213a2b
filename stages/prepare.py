"""Stage prepare: the Q&A source -> data/processed/{train,valid,test}.jsonl + metrics/data.json.

    python stages/prepare.py               # reads params.yaml (data, train sections)

Every sample is [persona system prompt, question, answer] in mlx-lm's chat format, checked
against the base model's own chat template (models/base).
"""
import argparse
import tempfile
from pathlib import Path

from mlx_lm.utils import load_tokenizer

from voicetune.errors import run_stage
from voicetune import dataset
from voicetune.chat_format import ChatTemplateError, check_rendered, profile_template, render
from voicetune.files import atomic_dir, write_json_atomic, write_jsonl
from voicetune.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--out", default="data/processed")
    ap.add_argument("--metrics", default="metrics/data.json")
    args = ap.parse_args()
    params = load_params(args.params)
    p, t = params["data"], params["train"]

    tokenizer = load_tokenizer(Path(args.model))
    profile = profile_template(tokenizer)
    system_prompt = p["system_prompt"]
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise SystemExit("params.yaml: data.system_prompt must be a non-empty string (the persona)")

    with tempfile.TemporaryDirectory() as download_dir:
        if p.get("hub_dataset"):
            files = dataset.download_hub_dataset(p["hub_dataset"], p.get("hub_revision"),
                                                 Path(download_dir))
        else:
            files = dataset.source_files(p["source"])
        exchanges = dataset.load_exchanges(files, forbidden=profile.specials)
    exchanges, duplicates = dataset.drop_duplicate_questions(exchanges)
    for note in duplicates[:10]:
        print(f"warning: {note}")
    if len(duplicates) > 10:
        print(f"warning: ... {len(duplicates) - 10} more duplicate questions dropped")

    splits = dataset.split(exchanges, p["seed"], p["valid_ratio"], p["test_ratio"],
                           by=p.get("split_by", "exchange"))
    dataset.check_split_sizes(splits, t["batch_size"])

    rows, lengths, problems = {}, {}, []
    for name, samples in splits.items():
        rows[name] = [{"messages": dataset.to_messages(ex, system_prompt)} for ex in samples]
        lengths[name] = []
        for ex, row in zip(samples, rows[name]):
            why = check_rendered(render(tokenizer, row["messages"]), row["messages"], profile)
            if why:
                problems.append(f"{ex.where}: {why}")
            lengths[name].append(len(tokenizer.apply_chat_template(row["messages"], return_dict=False)))
    if problems:
        raise ChatTemplateError(str(dataset.DataError(problems, header="chat template check failed")))

    with atomic_dir(args.out) as out:
        for name, split_rows in rows.items():
            write_jsonl(out / f"{name}.jsonl", split_rows)

    steps_per_epoch = len(rows["train"]) // t["batch_size"]  # mlx-lm drops the last partial batch
    all_lengths = [n for split_lengths in lengths.values() for n in split_lengths]
    summary = {
        "samples": {name: len(r) for name, r in rows.items()},
        "total": len(exchanges),
        "duplicates_dropped": len(duplicates),
        "steps_per_epoch": steps_per_epoch,
        "epochs": round(t["iters"] / steps_per_epoch, 2),
        "tokens": dataset.length_summary(all_lengths, t["max_seq_length"]),
        "train_over_max_seq_length": sum(1 for n in lengths["train"] if n > t["max_seq_length"]),
    }
    write_json_atomic(args.metrics, summary)

    tok = summary["tokens"]
    print(f"prepared {summary['total']} samples from {', '.join(map(str, files)) if not p.get('hub_dataset') else p['hub_dataset']}"
          f" -> train {len(rows['train'])} / valid {len(rows['valid'])} / test {len(rows['test'])}"
          f" (seed {p['seed']}, split by {p.get('split_by', 'exchange')})")
    print(f"  {steps_per_epoch} steps per epoch at batch {t['batch_size']}: "
          f"{t['iters']} iters = {summary['epochs']} epochs")
    print(f"  tokens per sample: p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, max {tok['max']}; "
          f"{tok['over_max_seq_length']} over max_seq_length {t['max_seq_length']}"
          + (" (they will be truncated in training)" if tok["over_max_seq_length"] else ""))
    if duplicates:
        print(f"  {len(duplicates)} duplicate questions dropped")


if __name__ == "__main__":
    run_stage("prepare", main)
