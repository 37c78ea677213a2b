"""Preference pairs from the arena's votes, for preference training (DPO and kin).

A vote for A or B says: to this question, under this persona, the winner's answer is better
than the loser's. That is one pair ``{"prompt", "chosen", "rejected", "system"}``, the offline
pair format of mlx-lm-lora (``mlx_lm_lora.train --train-mode dpo``; also cpo/orpo): its DPO
loader puts ``system`` (when the key is there) and ``prompt`` into chat messages and appends
``chosen`` or ``rejected`` as the assistant's turn, all rendered with the model's own chat
template, so the fields hold plain text, not templated strings. It reads a folder with
``train.jsonl`` (and ``valid.jsonl``/``test.jsonl`` if present), one pair per line.

Left out: ties and "both bad" (no preference), and votes whose two answers are the same text
(greedy decoding can make two models agree; a pair with chosen == rejected teaches nothing).
The votes file itself is user data and never rewritten here.
"""
from __future__ import annotations

from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.core.jsonl import write_jsonl
from voicetune.data.votes import VOTES, read_votes


def pairs_from_votes(votes: list[dict]) -> list[dict]:
    """One pair per vote for A or B, in vote order; ``system`` only when the vote had one (the
    loader would put a null system message into the chat otherwise)."""
    pairs = []
    for vote in votes:
        side = vote.get("vote")
        if side not in ("A", "B"):
            continue  # tie, both_bad
        prompt, a, b = vote.get("question"), vote.get("answer_a"), vote.get("answer_b")
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(a, str)
                and isinstance(b, str)) or a == b:
            continue
        chosen, rejected = (a, b) if side == "A" else (b, a)
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        system = vote.get("system")
        if isinstance(system, str) and system.strip():
            pair["system"] = system
        pairs.append(pair)
    return pairs


def write_pairs(path: str | Path, pairs: list[dict], votes: str | Path = VOTES) -> None:
    """The pairs as JSONL (UTF-8, one pair a line), replacing ``path`` atomically: on any
    failure it is left as it was. Refuses to write over the votes file read (``votes``) or the
    arena's own (VOTES), by any name (a symlink, a hard link): the votes are the only copy of
    the person's judgements."""
    path = Path(path)
    for kept in {Path(votes), VOTES}:
        if path.resolve() == kept.resolve() or (path.exists() and kept.exists()
                                                and path.samefile(kept)):
            raise UserError(f"{path} is the votes file {kept}: write the pairs somewhere else "
                            "(e.g. data/arena/pairs.jsonl); nothing written")
    if path.is_dir():
        raise UserError(f"{path} is a folder: name the file the pairs go to (e.g. "
                        f"{path / 'train.jsonl'}); nothing written")
    try:
        write_jsonl(path, pairs)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; nothing written") from None


def votes_used(sources: list[str], votes_file: str | Path) -> tuple[dict, list[str]]:
    """What the pairs_votes stage passes on to the pairs stage (``{"votes_file", "votes"}``,
    read back by ``voicetune.data.pairs.read_votes_used``), and the warnings of reading the
    votes. With arena among the preference ``sources``: every vote of ``votes_file``; without,
    none and no file read, the same bytes whatever the votes file holds, so that the pairs
    stage does not rerun on a vote it does not use."""
    if "arena" not in sources:
        return {"votes_file": None, "votes": []}, []
    votes, warnings = read_votes(votes_file)
    return {"votes_file": str(votes_file), "votes": votes}, warnings
