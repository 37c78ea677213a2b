"""The arena's votes: one JSON line per vote in ``data/arena/votes.jsonl``, user data.

The file is only ever appended to, never rewritten: each vote is written whole under an
exclusive lock (``fcntl.flock``; several server threads or processes never interleave), then
flushed and fsynced before the page is told it counts. A server killed mid-write can leave a
half-written last line; ``read_votes`` skips it with a warning and keeps every vote before it,
and the next ``append_vote`` starts on a fresh line so no later vote is glued to it.

A vote names the adapter it judged (``adapter``: the md5 DVC records for ``models/adapters``
in dvc.lock), so votes for an older adapter are never mixed silently with the current one's.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import yaml

VOTES = Path("data/arena/votes.jsonl")
CHOICES = ("A", "B", "tie", "both_bad")  # what a person can answer; both_bad counts apart
SCHEMA = 1


def append_vote(path: str | Path, record: dict) -> None:
    """Append ``record`` as one line, durable (fsync) when this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # the last line was torn by a crash: leave it on its own line
        os.write(fd, line)  # one write of the whole line: O_APPEND puts it at the end
        os.fsync(fd)
    finally:
        os.close(fd)


def read_votes(path: str | Path) -> tuple[list[dict], list[str]]:
    """All votes in the file (none if it does not exist), and a warning for each line that is
    not a whole vote (a half-written line after a crash), which is skipped."""
    path = Path(path)
    if not path.exists():
        return [], []
    votes, warnings = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                vote = json.loads(raw)
                if not isinstance(vote, dict) or vote.get("vote") not in CHOICES:
                    raise ValueError("not a vote")
            except ValueError:
                torn = "" if raw.endswith(b"\n") else " (the last line, cut short)"
                warnings.append(f"{path}:{number}: not a whole vote{torn}, skipped (half-written "
                                f"when the server was killed?): {raw[:60]!r}")
                continue
            votes.append(vote)
    return votes, warnings


def adapter_identity(root: str | Path = ".", stage: str = "train",
                     path: str = "models/adapters") -> str | None:
    """The md5 that dvc.lock records for the train stage's ``models/adapters`` (or another
    stage's output): the identity of the adapter being judged. None when dvc.lock has none."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None
