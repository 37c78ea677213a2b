"""The held-out questions: the test split (data/processed/test.jsonl), one conversation a row
whose last two messages are a question and the author's answer to it."""
from __future__ import annotations

from pathlib import Path

from voicetune.core.jsonl import read_jsonl


def _check(row: dict) -> str | None:
    messages = row.get("messages")
    if not (isinstance(messages, list) and len(messages) >= 2
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
        return "expected `messages`: a list of at least a question and an answer, each with a `content` string"
    return None


def read_test(path: str | Path, missing: str | None = None) -> list[dict]:
    """The rows of the test split, each checked (every problem reported as file:line).
    ``missing``: what to run when the file is absent (None: no rows)."""
    return read_jsonl(path, _check, missing=missing)


def battle_questions(path: str | Path) -> list[dict]:
    """The test split as the arena's questions: the conversation up to its last question (the
    evaluate stage's prompt), the question, the author's answer (shown after the vote) and the
    task (qa, or rewrite: the question is the instruction and a draft). No file, no questions."""
    return [{"messages": row["messages"][:-1], "question": row["messages"][-2]["content"],
             "reference": row["messages"][-1]["content"], "task": row.get("task", "qa")}
            for row in read_test(path)]


def prediction_records(tokenizer, prompts: list, rows: list[dict], answers: list[dict]) -> list[dict]:
    """One predictions row per question (data/eval/<model>.jsonl): the prompt as the model saw
    it, the question, the author's answer, and the model's (prediction, tokens, finish_reason)."""
    return [{"prompt": tokenizer.decode(prompt), "question": row["messages"][-2]["content"],
             "reference": row["messages"][-1]["content"], **answer,
             **({"task": row["task"]} if "task" in row else {})}  # a Q&A row as it always was
            for prompt, row, answer in zip(prompts, rows, answers)]
