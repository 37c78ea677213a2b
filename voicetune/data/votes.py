"""The arena's votes: one JSON line per vote in ``data/arena/votes.jsonl``, user data.

The file is only ever appended to, never rewritten: each vote is written whole under an
exclusive lock (``fcntl.flock``; several server threads or processes never interleave), then
flushed and fsynced before the page is told it counts. A server killed mid-write can leave a
half-written last line; ``read_votes`` skips it with a warning and keeps every vote before it,
and the next ``append_vote`` starts on a fresh line so no later vote is glued to it.

Readers take the same lock (shared): a vote being appended is never read half-written.

A vote names every weight file behind its two answers (``weights``: for each, the md5 dvc.lock
records for it; ``MADE_OF`` says which files each model runs on), so that votes for other
weights (a retrained adapter, another DPO round, another base model) are never mixed silently
with the current ones': ``weights_match`` is the one rule the ratings (the arena stage and the
page's table) and ``arena export``'s preference pairs count votes by.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Callable

import yaml

from voicetune.core.jsonl import iter_jsonl
from voicetune.models.registry import FILES

VOTES = Path("data/arena/votes.jsonl")
CHOICES = ("A", "B", "tie", "both_bad")  # what a person can answer; both_bad counts apart
SCHEMA = 2  # 2: ``weights``, and battles sampled with their own seed (1: ``adapter`` only)
# the weight files each model answers with: lora is the base weights under the SFT adapters,
# dpo the fused weights (base and SFT adapters made one) under the preference adapters
MADE_OF = {"base": ("base",), "lora": ("base", "adapters"), "fused": ("fused",),
           "dpo": ("fused", "preference_adapters")}
# each weight file: the stage and output whose md5 in dvc.lock is its identity
WEIGHTS = FILES


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
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # append_vote's lock: no vote read mid-write
        data = f.read()
    lines = data.split(b"\n")
    votes, warnings = [], []
    for where, vote, problem in iter_jsonl(path, data):
        if problem is None and vote.get("vote") in CHOICES:
            votes.append(vote)
            continue
        # the warning shows the line itself: after a crash it says more than the JSON error
        number = int(where.rsplit(":", 1)[1])
        last = number == len(lines)  # no line break after it: the writer was cut short
        raw = lines[number - 1] + (b"" if last else b"\n")
        torn = " (the last line, cut short)" if last else ""
        warnings.append(f"{where}: not a whole vote{torn}, skipped (half-written "
                        f"when the server was killed?): {raw[:60]!r}")
    return votes, warnings


def _locked_md5s(root: str | Path) -> dict:
    """{(stage, output path): md5} of every output dvc.lock records."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {(stage, out.get("path")): out.get("md5")
            for stage, entry in stages.items() for out in entry.get("outs", [])}


def weights_identity(root: str | Path = ".") -> dict[str, str | None]:
    """The identity of every weight file of ``WEIGHTS``: its md5 in dvc.lock (None: not there)."""
    md5s = _locked_md5s(root)
    return {name: md5s.get(output) for name, output in WEIGHTS.items()}


def battle_weights(models, identity: dict | None) -> dict[str, str | None]:
    """What a vote records: the identity of each weight file the ``models`` answered with."""
    return {w: (identity or {}).get(w) for m in models for w in MADE_OF[m]}


def weights_match(vote: dict, identity: dict) -> bool:
    """Whether ``vote`` judged answers made with the weights ``identity`` names: every weight
    file behind its two models recorded, and the same. A vote of schema 1 recorded only the
    adapters: its ``adapter`` (which pins the base it was trained on and the fused model made
    from both) must match, and for a dpo battle its ``preference_adapter`` too."""
    models = [m for m in (vote.get("model_a"), vote.get("model_b")) if m in MADE_OF]
    recorded = vote.get("weights")
    if isinstance(recorded, dict):
        needed = {w for m in models for w in MADE_OF[m]}
    else:
        recorded = {"adapters": vote.get("adapter"), "preference_adapters": vote.get("preference_adapter")}
        needed = {"adapters"} | ({"preference_adapters"} if "dpo" in models else set())
    return all(recorded.get(w) is not None and recorded.get(w) == identity.get(w) for w in needed)


def counted(setting: str, identity: dict | None) -> Callable[[dict], bool] | None:
    """Which votes the ratings count, as arena.adapter says: ``current``, the votes made with
    the weights ``identity`` names (``weights_match``); ``all``, or no weights recorded in
    dvc.lock (models given by path), every vote (None)."""
    if setting != "current" or not identity or not any(identity.values()):
        return None
    return lambda vote: weights_match(vote, identity)
