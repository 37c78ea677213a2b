"""The rewrite task's samples: a plain draft put into the author's voice.

A rewrite sample is [persona, ``INSTRUCTION`` + the draft, the author's original] and says so
(``"task": "rewrite"``); a row without ``task`` is a Q&A one. Training, evaluation, the chat's
``/rewrite``, the arena and the model card all ask for a rewrite the same way
(``user_message``, ``messages``). The pairs themselves come from the author's posts by
back-translation (``voicetune.data.paraphrase``, the rewrite stage).
"""
from __future__ import annotations

# The fixed instruction of every rewrite sample, in training, evaluation, chat and the arena.
INSTRUCTION = "Rewrite this in my voice:"


def user_message(draft: str) -> str:
    """The user's turn of a rewrite sample: the fixed instruction, then the draft."""
    return f"{INSTRUCTION}\n\n{draft.strip()}"


def draft_of(user_text: str) -> str | None:
    """The draft inside a rewrite sample's user turn; None for any other message."""
    head = f"{INSTRUCTION}\n\n"
    return user_text[len(head):] if user_text.startswith(head) else None


def messages(persona: str, draft: str) -> list[dict]:
    """The conversation that asks for ``draft`` in the author's voice, as the model is trained."""
    return [{"role": "system", "content": persona}, {"role": "user", "content": user_message(draft)}]


def task_of(row: dict) -> str:
    """A data or predictions row's task: ``rewrite`` where it says so, else ``qa``."""
    return row.get("task", "qa")


def by_task(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each task present, in order: ``{"qa": [...], "rewrite": [...]}``."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(task_of(row), []).append(row)
    return out
