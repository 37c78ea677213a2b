"""The prepare stage's work: the Q&A source as chat samples, each checked against the base
model's own chat template and measured in its tokens, and the summary metrics/data.json holds.

Every sample is [persona system prompt, question, answer] in mlx-lm's chat format. A sample
the template would render wrongly (a persona it drops, a question it cuts) is a problem, and
every problem is reported at once before anything is written.
"""
from __future__ import annotations

import math
from pathlib import Path

from mlx_lm.utils import load_tokenizer

from voicetune.core.errors import UserError
from voicetune.data import qa
from voicetune.models.chat_template import (ChatTemplateError, TemplateProfile, check_rendered,
                                            render)


def load_base_tokenizer(model: str | Path):
    """The tokenizer of the model folder ``model``, refused with the fix when it is none."""
    if not (Path(model) / "tokenizer_config.json").is_file():
        # else mlx-lm takes the path for a hub repo id and fails with a traceback
        raise UserError(f"{model}: no model folder (no tokenizer_config.json); build it with "
                        "`dvc repro base_model`, or pass --model a Hugging Face-format folder")
    return load_tokenizer(Path(model))


def read_source(p: dict, download_dir: Path, forbidden) -> tuple[list[qa.Exchange], dict]:
    """The exchanges of the ``data`` params' source (a local path, or the hub dataset at its
    commit, downloaded into ``download_dir``), and what was read, for the metrics."""
    if p.get("hub_dataset"):
        files, source = qa.download_hub_dataset(p["hub_dataset"], p.get("hub_revision"), download_dir)
    else:
        files = qa.source_files(p["source"])
        source = {"path": str(p["source"]), "files": [str(f) for f in files]}
    return qa.load_exchanges(files, forbidden=forbidden), source


def token_lengths(tokenizer, messages: list[dict]) -> tuple[int, int]:
    """(prompt, total) tokens of one sample: the prompt as mlx-lm masks it in training (the
    turns before the answer, with the generation prompt), the total the whole chat."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
    total = tokenizer.apply_chat_template(messages, return_dict=False)
    return len(prompt), len(total)


def samples(splits: dict[str, list[qa.Exchange]], system_prompt: str, tokenizer,
            profile: TemplateProfile) -> tuple[dict[str, list[dict]], dict[str, list[qa.Length]]]:
    """Each split's rows (``{"messages"}``) and their token lengths. Every sample is rendered
    with the model's chat template and checked (``check_rendered``); a ``ChatTemplateError``
    lists every sample it renders wrongly."""
    rows, lengths, problems = {}, {}, []
    for name, exchanges in splits.items():
        # a rewrite sample says so; a Q&A one stays as it always was (no key)
        rows[name] = [{"messages": qa.to_messages(ex, system_prompt),
                       **({"task": ex.task} if ex.task != "qa" else {})} for ex in exchanges]
        lengths[name] = []
        for ex, row in zip(exchanges, rows[name]):
            why = check_rendered(render(tokenizer, row["messages"]), row["messages"], profile)
            if why:
                problems.append(f"{ex.where}: {why}")
            lengths[name].append(qa.Length(ex.where, *token_lengths(tokenizer, row["messages"])))
    if problems:
        raise ChatTemplateError(str(qa.DataError(problems, header="chat template check failed")))
    return rows, lengths


def read_rewrites(path: str | Path, forbidden) -> list[qa.Exchange]:
    """The rewrite stage's pairs at ``path`` as exchanges (none when the file is empty)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no rewrite pairs; run `dvc repro rewrite` (data.task asks for them)")
    if not Path(path).read_text(encoding="utf-8").strip():
        return []
    return qa.load_exchanges([path], forbidden=forbidden)


def split_rewrites(exchanges: list[qa.Exchange], p: dict) -> dict[str, list[qa.Exchange]]:
    """The rewrite pairs split by post with the ``data`` params' seed and ratios, test and
    valid given at least one post each (a sample set is small): a post's passages never
    straddle splits, so no test passage was trained on through its neighbours."""
    return qa.split(exchanges, p["seed"], p["valid_ratio"], p["test_ratio"], by="post", at_least=1)


def mix(qa_splits: dict, rewrite_splits: dict, ratio: float | None, seed: int) -> dict:
    """Each split's Q&A exchanges then its rewrite ones; with ``ratio`` (data.rewrite_ratio)
    the training rewrites are a seeded draw of at most ``ratio`` per Q&A training exchange."""
    train = rewrite_splits["train"]
    if ratio is not None and len(train) > ratio * len(qa_splits["train"]):
        keep = sorted(qa.seeded_order(len(train), seed)[:math.floor(ratio * len(qa_splits["train"]))])
        train = [train[i] for i in keep]
    return {name: qa_splits[name] + (train if name == "train" else rewrite_splits[name])
            for name in ("train", "valid", "test")}


def task_counts(rows: dict[str, list[dict]]) -> dict:
    """Each split's samples per task."""
    return {name: {task: sum(r.get("task", "qa") == task for r in split_rows) for task in qa.TASKS}
            for name, split_rows in rows.items()}


def summary(source: dict, rows: dict[str, list[dict]], lengths: dict[str, list[qa.Length]],
            total: int, duplicates: int, conflicts: int, t: dict) -> dict:
    """metrics/data.json: what was read, the split sizes, the drops, and the samples' tokens
    against the ``train`` params ``t``."""
    # training takes every sample once per epoch, the last batch of an epoch maybe partial
    steps_per_epoch = math.ceil(len(rows["train"]) / t["batch_size"])
    all_lengths = [x.total for split_lengths in lengths.values() for x in split_lengths]
    return {
        "source": source,  # what was read: the path(s), or the hub dataset at its commit sha
        "samples": {name: len(r) for name, r in rows.items()},
        "tasks": task_counts(rows),
        "total": total,
        "duplicates_dropped": duplicates + conflicts,  # conflicts included
        "conflicting_answers": conflicts,
        "steps_per_epoch": steps_per_epoch,
        # train.epochs as given, or what train.iters makes of them
        "epochs": t["epochs"] if t.get("epochs") is not None else round(t["iters"] / steps_per_epoch, 2),
        "tokens": qa.length_summary(all_lengths, t["max_seq_length"]),
        "train_over_max_seq_length": sum(1 for x in lengths["train"] if x.total > t["max_seq_length"]),
    }
