"""The project code a script runs: every project module it imports, transitively, read from
the source (``ast``) without importing anything.

Two users: tests/test_dvc_graph.py checks that dvc.yaml lists each of a stage's modules as a
dep, and a training stage's checkpoint fingerprint hashes them (``code_fingerprint``), so a
run resumed after a code change (another loss, another step) starts over instead of
continuing someone else's numbers.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: voicetune/ and stages/ beside each other


def module_file(name: str, root: Path) -> Path | None:
    """The project file that defines the dotted module ``name``, if it is a project module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, root: Path) -> set[str]:
    """Dotted names of every module ``path`` may import (at top level or inside functions),
    with ``from package import name`` giving both ``package`` and ``package.name``."""
    rel = path.relative_to(root).with_suffix("")
    package = rel.parts[:-1]  # the package of pkg/a.py and of pkg/__init__.py is pkg
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # a module imports its parent packages' __init__ first
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def project_imports(script: str | Path, root: Path = ROOT) -> set[Path]:
    """The script and every project module it imports, transitively."""
    script = Path(script)
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path, root):
            found = module_file(name, root) or (module_file(name, script.parent)
                                                if "." not in name else None)
            if found is not None:
                todo.append(found)
    return seen


def code_fingerprint(script: str | Path, root: Path | None = None) -> str:
    """Hash of the code ``script`` runs: each of its project modules, by path and contents.
    Conservative: a changed comment counts too, as it does for DVC's deps. ``root`` defaults
    to the project the script is in (stages/ beside voicetune/), wherever it was copied."""
    h = hashlib.sha256()
    script = Path(script).resolve()
    root = (root or script.parents[1]).resolve()
    for path in sorted(project_imports(script, root)):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
