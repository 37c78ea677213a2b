"""Before `dvc repro`: params.yaml and the files the pipeline reads, with the project's messages.

    python -m voicetune.tools.preflight        # `make repro` runs it first

DVC checks a stage's dependencies before the stage runs, so a missing ``data.source`` or
``ingest.source`` (the usual state right after ``make recipe R=my-blog``) would only show
DVC's ``[Errno 2] No such file or directory``, naming neither the params key nor the fix.
This reads dvc.yaml as written: a dependency spelt ``${key}`` is reported under that key of
params.yaml, with what to put there. Paths another stage writes are not sources and are not
checked. Every problem is reported at once; nothing is written. The command line is
voicetune.tools.preflight.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from voicetune.core.errors import UserError
from voicetune.core.params import load_params
from voicetune.data.posts import to_create

TEMPLATE = re.compile(r"\$\{\s*([\w.]+)\s*\}")

# What belongs at a params key a stage reads as a file, given the missing path.
WHAT_TO_PUT = {
    "ingest.source": to_create,  # the posts: what `make recipe R=my-blog` says too
    "data.source": lambda path: (
        f"{path} does not exist (the prepare stage reads it): it is the Q&A dataset, a JSONL "
        "file of conversations like data/sample/tilly_brask.jsonl, or data/ingested/pairs.jsonl "
        "(the ingest stage's output, when ingest runs)"),
}


class PreflightError(UserError):
    pass


def _lookup(context: dict, dotted: str):
    value = context
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _expanded(stages: dict, params: dict):
    """(name, body, context) of every stage, a ``foreach`` stage once per item, as DVC does."""
    for name, stage in stages.items():
        if "foreach" not in stage:
            yield name, stage, params
            continue
        items = stage["foreach"]
        pairs = items.items() if isinstance(items, dict) else enumerate(items)
        for key, item in pairs:
            yield f"{name}@{key}", stage["do"], {**params, "key": key, "item": item}


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _resolve(text: str, context: dict) -> str:
    return TEMPLATE.sub(lambda m: str(_lookup(context, m[1])), text)


def _is_written(path: str, written: list[str]) -> bool:
    path = path.rstrip("/")
    return any(path == out.rstrip("/") or path.startswith(out.rstrip("/") + "/")
               for out in written)


def missing_sources(root: Path, params: dict, dvc_file: str = "dvc.yaml") -> list[str]:
    """One message per file a stage reads that does not exist and no stage writes."""
    stages = list(_expanded((yaml.safe_load((root / dvc_file).read_text()) or {})
                            .get("stages") or {}, params))
    written = [_resolve(path, context) for _, body, context in stages
               for kind in ("outs", "metrics", "plots") for path in _paths(body.get(kind))]
    missing: dict[str, tuple[str | None, list[str]]] = {}  # path -> (params key, readers)
    for name, body, context in stages:
        for dep in _paths(body.get("deps")):
            path = _resolve(dep, context)
            if _is_written(path, written) or (root / path).exists():
                continue
            key = TEMPLATE.fullmatch(dep.strip())
            key = key[1] if key and key[1].split(".")[0] not in ("item", "key") else None
            readers = missing.setdefault(path, (key, []))[1]
            if name not in readers:
                readers.append(name)
    problems = []
    for path, (key, readers) in missing.items():
        who = " and ".join(readers) + (" stages read" if len(readers) > 1 else " stage reads")
        if key:
            hint = WHAT_TO_PUT.get(key, lambda path: (
                f"{path} does not exist (the {who} it): create it, or point the key at a file "
                "that exists"))
            problems.append(f"params.yaml: {key}: {hint(path)}")
        else:
            problems.append(f"{dvc_file}: {path} does not exist and no stage writes it (the "
                            f"{who} it): restore it (`git checkout -- {path}`)")
    return problems


def check(root: Path = Path("."), params_file: str = "params.yaml") -> None:
    """Raise one error listing every problem (params first: paths come from them)."""
    params = load_params(root / params_file)  # ParamsError: every problem, with the closest key
    problems = missing_sources(root, params)
    if problems:
        raise PreflightError(f"{len(problems)} problem{'s' * (len(problems) > 1)} before "
                             "`dvc repro` (nothing was run):\n"
                             + "\n".join(f"  {p}" for p in problems))

