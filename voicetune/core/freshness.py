"""Are a stage's outputs there and current? DVC knows: the tools ask it before using them.

`make chat` with `--model lora`, or `make publish`, must not silently use adapters trained
with other params, or metrics of an older run. ``require_fresh`` asks DVC (as `dvc status`
does) whether the stages behind what a tool reads are up to date, and stops with a message
naming what changed and what to run.
"""
from __future__ import annotations

import logging
from pathlib import Path

from voicetune.core.errors import UserError


class StaleOutputsError(UserError):
    pass


def changes(stages: list[str], root: str | Path = ".") -> dict[str, list[str]]:
    """``{stage: [what changed, ...]}`` for every listed stage (and the stages it depends
    on) that `dvc repro` would rerun; empty when all of them are current. A stage that reruns
    on every repro by design (``always_changed``, e.g. model_source) counts only if its
    outputs changed."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    # DVC draws "Collecting files and computing hashes" bars on a terminal unless its logger
    # is quieter than ERROR: a chat or a publish run would start with a screenful of them.
    # Its failures still arrive, as the exceptions below.
    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.CRITICAL)
    try:
        with Repo(str(root)) as repo:
            status = repo.status(targets=stages, with_deps=True)
    except LockError:
        raise StaleOutputsError(
            f"cannot check whether {', '.join(stages)} are current: another DVC command (a "
            f"`dvc repro`?) holds the lock of {Path(root).resolve()}; wait for it to finish, "
            "then retry") from None
    except DvcException as err:  # e.g. a stage missing from dvc.yaml, or not a DVC project
        raise StaleOutputsError(
            f"cannot check whether {', '.join(stages)} are current: DVC says: {err}. Run this "
            "from the project's root, with a dvc.yaml that defines these stages") from None
    finally:
        dvc_logger.setLevel(level)
    found = {}
    for stage, entries in status.items():
        what = []
        for entry in entries:
            if isinstance(entry, str):
                if entry != "always changed":
                    what.append(entry)
                continue
            for kind, items in entry.items():  # {"changed deps": {"path": "modified"}, ...}
                for name, how in (items.items() if isinstance(items, dict) else []):
                    if isinstance(how, dict):  # params: {"params.yaml": {"lora": "modified"}}
                        how = ", ".join(f"{key} {state}" for key, state in how.items())
                    what.append(f"{kind.removeprefix('changed ')} {name}: {how}")
        if what:
            found[stage.split(":")[-1]] = what
    return found


def require_fresh(stages: list[str], needed: list[str | Path], root: str | Path = ".") -> None:
    """Raise StaleOutputsError unless every path in ``needed`` exists and ``stages`` are
    up to date according to DVC."""
    root = Path(root)
    missing = [str(p) for p in needed if not (root / p).exists()]
    if missing:
        raise StaleOutputsError(f"{', '.join(missing)} missing: run `make repro` (or `dvc repro "
                                f"{' '.join(stages)}`) first")
    stale = changes(stages, root)
    if stale:
        lines = [f"  {stage}: {'; '.join(what[:4])}{' ...' if len(what) > 4 else ''}"
                 for stage, what in stale.items()]
        raise StaleOutputsError(
            f"{', '.join(map(str, needed))} would be stale: DVC says these stages must rerun\n"
            + "\n".join(lines) + f"\nRun `make repro` (or `dvc repro {' '.join(stages)}`) first")
