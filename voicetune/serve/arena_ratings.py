"""The arena page's ratings table: the arena stage's own computation (``voicetune.evaluate.ratings``)
over the votes that count now (``voicetune.data.votes.counted``), so page and stage agree."""
from __future__ import annotations

from voicetune.data.votes import counted


def ratings_fn(params: dict, identity: dict | None, voice: dict[str, dict] | None = None):
    """votes -> the table the page shows: the arena stage's own computation (``identity``:
    the weights' md5s in dvc.lock; None, models given by path: every vote counts). ``voice``:
    each model's voice score (``ratings.voice_models()``), a column of the table when given."""
    from voicetune.evaluate.ratings import compute_ratings, table_rows

    arena = params["arena"]
    current = counted(arena["adapter"], identity)

    def ratings(votes):
        result = compute_ratings(votes, current, weights=identity, models=arena["models"],
                                 rounds=arena["rounds"], seed=arena["seed"])
        return table_rows(result, voice)
    return ratings
