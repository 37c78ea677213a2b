"""Apply a recipe (a partial params.yaml) to params.yaml, keeping its comments and order.

    python -m voicetune.tools.recipe recipes/phi3-blog.yaml      # or: make recipe R=phi3-blog

A recipe uses params.yaml's own section/key names and sets only what it changes. Every key
must already exist in params.yaml (a misspelt one is refused with the closest valid name),
and the merged result must pass the same schema as every stage's params (voicetune.core.params);
on any error nothing is written, and a value the recipe sets is reported at its own line
(``recipes/x.yaml:12: train.batch_size: got 0; ...``). Afterwards `dvc params diff` shows the
change and `dvc repro` reruns what depends on it; if ingest.source does not exist yet (the
my-blog recipe's posts/), ``missing_posts`` says what to create first. The command line is
voicetune.tools.recipe.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from voicetune.core.errors import UserError
from voicetune.core.files import write_text_atomic
from voicetune.core.params import ParamsError, suggest, validate, yaml_error_text


class RecipeError(UserError, ValueError):
    pass


def _yaml() -> YAML:
    """Round-trip YAML that writes params.yaml back byte for byte when nothing changes."""
    rt = YAML()
    rt.width = 4096  # never re-wrap long lines
    # ruamel writes None as an empty value; params.yaml spells it `null`
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # True == 1 in Python


def _fresh(value, old):
    """The recipe's value without the recipe file's comments; a list keeps params.yaml's
    style (flow ``[a, b]`` or block)."""
    if not isinstance(value, list):
        return value
    seq, like = CommentedSeq(value), old if isinstance(old, CommentedSeq) else value
    if isinstance(like, CommentedSeq) and like.fa.flow_style():
        seq.fa.set_flow_style()
    return seq


def merge(params: CommentedMap, recipe: dict) -> list[tuple[str, object, object]]:
    """Deep-merge ``recipe`` into ``params`` in place; return (key path, old, new) per change.

    Raises RecipeError listing every unknown key (with the closest valid name) before changing
    anything.
    """
    errors = _check(params, recipe, "")
    if errors:
        raise RecipeError("\n".join(f"{key}{text}" for key, text in errors))
    return _merge(params, recipe, "")


def _merge(params: CommentedMap, recipe: dict, path: str) -> list[tuple[str, object, object]]:
    """The merge itself; what ``_check`` refuses (unknown keys, a value for a section or a
    section for a value) is left out, so the rest can still be checked."""
    changes = []
    for key, new in recipe.items():
        if key not in params or isinstance(params[key], dict) != isinstance(new, dict):
            continue
        name, old = f"{path}{key}", params[key]
        if isinstance(old, dict):
            changes += _merge(old, new, f"{name}.")
        elif not _same(old, new):
            params[key] = _fresh(new, old)  # the key's comments live in params, so they stay
            changes.append((name, old, new))
    return changes


def _check(params: dict, recipe, path: str) -> list[tuple[str, str]]:
    """(key path, the rest of the message) per key of ``recipe`` that does not fit ``params``."""
    where = path.rstrip(".") or "params.yaml"
    if not isinstance(recipe, dict):
        return [(where, f" is a section: set its keys ({', '.join(params)}), not a value")]
    errors = []
    for key, new in recipe.items():
        name = f"{path}{key}"
        if key not in params:
            errors.append((name, f": unknown key; {suggest(name, list(params))}"))
        elif isinstance(params[key], dict):
            errors += _check(params[key], new, f"{name}.")
        elif isinstance(new, dict):
            errors.append((name, " is a value in params.yaml, not a section"))
    return errors


def _line(recipe, key_path: str) -> int | None:
    """The line (from 1) of the recipe file where the dotted ``key_path`` (``lora.keys[1]``) is
    set, or None if the recipe does not set it (a value params.yaml already had)."""
    node, line = recipe, None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key_path):
        if isinstance(node, CommentedMap) and part in node:
            line, node = node.lc.key(part)[0], node[part]
        elif isinstance(node, CommentedSeq) and part.startswith("[") and int(part[1:-1]) < len(node):
            line, node = node.lc.item(int(part[1:-1]))[0], node[int(part[1:-1])]
        elif isinstance(node, CommentedMap) or line is None:
            return None  # a key the recipe does not set
        else:
            break  # inside a value the recipe sets whole: its line
    return line + 1


def _where(recipe_path: Path, recipe, key_paths: list[str]) -> str | None:
    """``<recipe>:<line>`` of the earliest line setting one of ``key_paths``; None if the recipe
    sets none of them."""
    lines = [n for n in (_line(recipe, k) for k in key_paths) if n is not None]
    return f"{recipe_path}:{min(lines)}" if lines else None


def _located(problem: str, params_path: Path, recipe_path: Path, recipe) -> str:
    """A schema problem ``<params.yaml>: <key path>: ...`` about a value the recipe sets, as
    ``<recipe>:<line>: <key path>: ...``: the recipe's own mistake, where to fix it. Problems
    of params.yaml's own values keep its name."""
    prefix = f"{params_path}: "
    if not problem.startswith(prefix):
        return problem
    rest = problem[len(prefix):]
    keys = rest.split(": ", 1)[0].split(" + ")  # a rule across keys names both: a + b
    where = _where(recipe_path, recipe, keys)
    return f"{where}: {rest}" if where else problem


def _mismatch(read, meant, path=""):
    """First (key path, read, meant) where PyYAML's reading of the written file differs."""
    if isinstance(meant, dict) and isinstance(read, dict):
        for key in meant:
            found = _mismatch(read.get(key), meant[key], f"{path}{key}.")
            if found:
                return found
        return None
    return None if _same(read, meant) else (path.rstrip("."), read, meant)


def _load(rt: YAML, path: Path):
    """A YAML file read round-trip; a syntax error becomes a RecipeError with file:line."""
    try:
        return rt.load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RecipeError(f"{path}: cannot be read: {err}") from None
    except YAMLError as err:
        raise RecipeError(f"{path}{yaml_error_text(err)}") from None


def apply(recipe_path: str | Path, params_path: str | Path = "params.yaml"):
    """Merge the recipe into params.yaml (atomically); return the list of changes."""
    recipe_path, params_path = Path(recipe_path), Path(params_path)
    if not recipe_path.is_file():
        names = sorted(p.stem for p in recipe_path.parent.glob("*.yaml"))
        raise RecipeError(f"no recipe {recipe_path}" + (f"; available: {', '.join(names)}"
                                                         if names else ""))
    rt = _yaml()
    recipe = _load(rt, recipe_path)
    if not isinstance(recipe, dict) or not recipe:
        raise RecipeError(f"{recipe_path}: expected a mapping of params.yaml sections")
    params = _load(rt, params_path)
    if not isinstance(params, dict):
        raise RecipeError(f"{params_path}: expected a mapping of sections (model, data, ...)")
    # every problem at once: keys that don't fit params.yaml, then the schema's verdict on
    # the rest merged (which the stages would give, on exactly the text to be written)
    problems = [f"{_where(recipe_path, recipe, [key]) or recipe_path}: {key}{text}"
                for key, text in _check(params, recipe, "")]
    changes = _merge(params, recipe, "")
    out = io.StringIO()
    rt.dump(params, out)
    # The stages read params.yaml with PyYAML (YAML 1.1), the recipe was read as YAML 1.2:
    # refuse values the two read differently (1e-5 is a string in YAML 1.1, 1.0e-5 a float).
    bad = _mismatch(yaml.safe_load(out.getvalue()), params)
    if bad:
        raise RecipeError(f"{_where(recipe_path, recipe, [bad[0]]) or recipe_path}: {bad[0]} = "
                          f"{bad[2]!r} would be read back as "
                          f"{bad[1]!r} by PyYAML; write it unambiguously (e.g. 1.0e-5, not 1e-5)")
    try:
        validate(yaml.safe_load(out.getvalue()), str(params_path))
    except ParamsError as err:
        problems += [_located(p, params_path, recipe_path, recipe) for p in err.problems]
    if problems:
        raise RecipeError(f"{recipe_path} does not fit {params_path} (nothing was written):\n"
                          + "\n".join(f"  {p}" for p in problems))
    if changes:
        write_text_atomic(params_path, out.getvalue())
    return changes


def missing_posts(params_path: str | Path) -> str | None:
    """What to create when params.yaml's ``ingest.source`` (relative to the project root, the
    folder of params.yaml) does not exist: a recipe such as my-blog points at the user's posts,
    which only the user can put there."""
    params_path = Path(params_path)
    source = ((yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}).get("ingest") or {}).get("source")
    if not isinstance(source, str) or (params_path.parent / source).exists():
        return None
    from voicetune.data.posts import to_create

    return to_create(source.rstrip("/"))

