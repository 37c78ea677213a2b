"""Preference pairs: read from the pairs stage's JSONL files and tokenized, both answers
chat-templated with the prompt masked."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from mlx_lm.tuner.datasets import ChatDataset

from voicetune.core.jsonl import JsonlError, read_jsonl
from voicetune.train.loop import TrainingError


class PreferenceError(TrainingError):
    """A preference run that cannot go on: its pairs, its method or its reference."""


class Pair(NamedTuple):
    """One preference pair as token sequences, each ``(tokens, answer offset)`` as mlx-lm's
    ChatDataset gives them with ``mask_prompt``."""

    chosen: tuple[list[int], int]
    rejected: tuple[list[int], int]


def pair_problem(row: dict) -> str | None:
    """What is wrong with a pair row, if anything (other keys than these are ignored)."""
    bad = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row.get(key), str)]
    if "prompt" not in bad and not row["prompt"].strip():
        bad.insert(0, "prompt")
    if row.get("system") is not None and not isinstance(row["system"], str):
        bad.append("system")
    if bad:
        return (f"{', '.join(bad)}: expected strings (a non-empty prompt, the chosen and "
                "rejected answers, optionally a system prompt)")
    return None


def read_pairs(path: str | Path) -> list[dict]:
    """The pairs of a JSONL file, each ``{"prompt", "chosen", "rejected"}`` and optionally
    ``"system"``; every bad line is named as ``file:line`` (a ``JsonlError``)."""
    rows, problems = read_jsonl(path, pair_problem, missing="the pairs stage writes it", skip_bad=True)
    if problems:
        raise JsonlError(problems, f"{len(problems)} bad pairs" if len(problems) > 1 else None)
    return rows


def check_counts(train: list, valid: list) -> None:
    """Both splits must hold pairs: training needs something to learn from, early stopping
    something to validate on."""
    for name, pairs in (("training", train), ("validation", valid)):
        if not pairs:
            raise PreferenceError(f"no {name} pairs: the pairs stage wrote none (see "
                                  "preference.pairs, preference.valid_ratio, preference.sources)")


def pair_messages(row: dict, answer: str) -> list[dict]:
    """The chat of a pair with one of its answers: [system,] user, assistant."""
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": answer}]


def tokenize_pairs(rows: list[dict], tokenizer, max_seq_length: int, where: str = "pairs") -> list[Pair]:
    """Both answers of each pair, chat-templated with the prompt masked. A pair that keeps no
    answer token within ``max_seq_length`` is refused: it would train nothing, and ORPO's
    mean log-probability would be 0/0."""
    dataset = ChatDataset([], tokenizer, mask_prompt=True)
    pairs, too_long = [], []
    for i, row in enumerate(rows):
        pair = Pair(*(dataset.process({"messages": pair_messages(row, row[key])})
                      for key in ("chosen", "rejected")))
        if any(min(len(tokens), max_seq_length) <= offset for tokens, offset in pair):
            too_long.append(f"pair {i + 1} (prompt: {pair.chosen[1]} tokens)")
        pairs.append(pair)
    if too_long:
        raise PreferenceError(
            f"{where}: {len(too_long)} pairs keep no answer token within preference.max_seq_length="
            f"{max_seq_length}: {', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}; "
            "raise preference.max_seq_length")
    return pairs
