"""The package's architecture, read from the code: its rooms (subpackages), their modules, who
imports whom, and the rule of which room may import which.

``docs/architecture.md`` is rendered from here (``make architecture``), never drawn by hand;
tests/project/test_architecture.py fails when it is stale or when an import breaks the rule.
Imports are read with ``ast`` (top level and inside functions), nothing is imported.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "voicetune"

# Each room and the rooms it may import (itself always). Read bottom-up: core is the ground
# floor; the library's rooms never import bench, fixtures or tools.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "data": {"core", "models"},
    "train": {"core", "models", "data"},
    "evaluate": {"core", "models", "data", "train"},  # train: the loss reference perplexity uses
    "serve": {"core", "models", "data", "evaluate"},
    "export": {"core", "models", "data", "evaluate"},
    "project": {"core", "data"},
    "fixtures": {"core", "models"},
    "bench": {"core", "models", "data", "train", "evaluate", "serve", "export", "fixtures"},
    "tools": {"core", "models", "data", "train", "evaluate", "serve", "export", "project",
              "fixtures", "bench"},
}
LIBRARY = ("core", "models", "data", "train", "evaluate", "serve", "export", "project")
FACE = ""  # voicetune/__init__.py: the package's face, the one module outside every room


@dataclass(frozen=True)
class Module:
    name: str   # dotted: voicetune.core.params
    path: Path
    lines: int

    @property
    def room(self) -> str:
        parts = self.name.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and self.path.name == "__init__.py") else FACE


def modules(root: Path) -> dict[str, Module]:
    """Every module of the package under ``root``, by dotted name (a package by its own)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, len(path.read_text(encoding="utf-8").splitlines()))
    return found


def _targets(node: ast.AST, module: Module, known: dict[str, Module]) -> set[str]:
    """The project modules one import statement names (the most specific one that exists)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return {n for n in names if n in known}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        package = module.name.split(".") if module.path.name == "__init__.py" else module.name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    out = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            out.add(f"{base}.{alias.name}")
        elif base in known:
            out.add(base)
    return out


def arrows(root: Path) -> set[tuple[str, str]]:
    """(importer, imported) for every import between two modules of the package."""
    known = modules(root)
    edges = set()
    for module in known.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in ast.walk(tree):
            edges.update((module.name, t) for t in _targets(node, module, known) if t != module.name)
    return edges


def violations(root: Path) -> list[str]:
    """Imports that break ``ALLOWED``, and modules outside every room but the face."""
    known = modules(root)
    problems = [f"{m.path.relative_to(root)}: not in a room (a subpackage of {PACKAGE}/)"
                for m in known.values() if m.room == FACE and m.name != PACKAGE]
    problems += [f"{m.path.relative_to(root)}: room {m.room!r} is not in ALLOWED"
                 for m in known.values() if m.room not in (FACE, *ALLOWED)]
    for a, b in sorted(arrows(root)):
        ra, rb = known[a].room, known[b].room
        if ra in (FACE, rb) or ra not in ALLOWED:
            continue
        if rb == FACE or rb not in ALLOWED[ra]:
            problems.append(f"{known[a].path.relative_to(root)} imports {b}: "
                            f"room {ra!r} may import only {sorted(ALLOWED[ra]) or 'nothing else'}")
    return problems


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def figures(root: Path) -> dict:
    """The numbers the closing notes quote: modules, arrows, the largest module, the longest
    stage script."""
    known = modules(root)
    largest = max(known.values(), key=lambda m: m.lines)
    stages = sorted((root / "stages").glob("*.py"))
    longest = max(stages, key=lambda p: len(p.read_text().splitlines()))
    return {"modules": len(known), "arrows": len(arrows(root)),
            "largest_module": f"{largest.path.relative_to(root).as_posix()} ({largest.lines} lines)",
            "longest_stage_script": f"{longest.relative_to(root).as_posix()} "
                                    f"({len(longest.read_text().splitlines())} lines)"}


def render(root: Path) -> str:
    """docs/architecture.md: rooms, modules and the picture of who imports whom."""
    known = modules(root)
    edges = arrows(root)
    rooms = [r for r in ALLOWED if any(m.room == r for m in known.values())]
    between: dict[tuple[str, str], int] = {}
    for a, b in edges:
        ra, rb = known[a].room or PACKAGE, known[b].room or PACKAGE
        if ra != rb:
            between[ra, rb] = between.get((ra, rb), 0) + 1
    stage_rooms: dict[str, int] = {}
    for script in sorted((root / "stages").glob("*.py")):
        fake = Module("stages." + script.stem, script, 0)
        tree = ast.parse(script.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            for t in _targets(node, fake, known):
                if known[t].room:
                    stage_rooms[known[t].room] = stage_rooms.get(known[t].room, 0) + 1
    f = figures(root)
    out = [
        "# Architecture",
        "",
        "<!-- generated by `make architecture` (voicetune/project/architecture.py) from the code's "
        "imports: do not edit by hand; tests/project/test_architecture.py fails when it is stale -->",
        "",
        "The package's folders are its architecture: each room (subpackage) owns one concern and "
        "imports only the rooms below it. The stage scripts in `stages/` and the tools in "
        "`voicetune/tools/` sit on top and call into the rooms; nothing in the library imports a "
        "tool, a benchmark or a test fixture.",
        "",
        f"**{f['modules']} modules, {f['arrows']} import arrows between them; largest module "
        f"{f['largest_module']}; longest stage script {f['longest_stage_script']}.**",
        "",
        "## Who imports whom",
        "",
        "Arrows between rooms, labelled with the number of module-to-module imports they stand for.",
        "",
        "```mermaid",
        "flowchart TD",
        "  stages([stages/*.py])",
    ]
    out += [f"  {r}[{r}]" for r in rooms]
    out += [f"  stages -->|{n}| {r}" for r, n in sorted(stage_rooms.items())]
    out += [f"  {a} -->|{n}| {b}" for (a, b), n in sorted(between.items())]
    out += ["```", "", "## The rooms", ""]
    out += ["| room | may import | what it owns |", "|---|---|---|"]
    for r in rooms:
        out.append(f"| `{r}` | {', '.join(f'`{x}`' for x in sorted(ALLOWED[r], key=list(ALLOWED).index)) or '—'} "
                   f"| {_summary(root / PACKAGE / r / '__init__.py')} |")
    out += ["", "## The modules", "", "| module | lines | what it is |", "|---|---:|---|"]
    for m in sorted(known.values(), key=lambda m: m.name):
        if m.path.name != "__init__.py" or m.name == PACKAGE:
            out.append(f"| `{m.path.relative_to(root).as_posix()}` | {m.lines} | {_summary(m.path)} |")
    return "\n".join(out) + "\n"
