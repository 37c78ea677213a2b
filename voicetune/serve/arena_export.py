"""``arena export``: the arena's votes -> preference pairs (DPO format) for the preference stage."""
from __future__ import annotations

import sys
from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.data.votes import VOTES, read_votes, weights_identity, weights_match

PAIRS = Path("data/arena/pairs.jsonl")


def export_pairs(votes_path: str | Path, out: str | Path, all_adapters: bool = False) -> int:
    """Write the preference pairs of the votes (those for the current weights, or all of them
    with ``all_adapters``) to ``out``, and say how many came from how many votes."""
    from voicetune.data.vote_pairs import pairs_from_votes, write_pairs

    votes_path = Path(votes_path)
    if not votes_path.exists():
        raise UserError(f"--votes {votes_path}: no such file (the arena page, make arena, writes "
                        f"the votes to {VOTES}); nothing written")
    if not votes_path.is_file():
        raise UserError(f"--votes {votes_path}: not a file; nothing written")
    votes, warnings = read_votes(votes_path)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    read = f"{len(votes)} vote(s) read from {votes_path}"
    if not all_adapters:
        identity = weights_identity(".")
        kept = [v for v in votes if weights_match(v, identity)]
        read += (f", {len(kept)} for the current weights ({len(votes) - len(kept)} for other "
                 f"weights{'' if any(identity.values()) else ': dvc.lock records none'}; "
                 "--all-adapters takes them all)")
        votes = kept
    pairs = pairs_from_votes(votes)
    write_pairs(out, pairs, votes=votes_path)
    print(f"{read}; {len(pairs)} preference pair(s) from them (ties, both bad and equal "
          f"answers give none) -> {out}")
    return 0
