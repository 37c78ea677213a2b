"""docs/architecture.md is rendered from the code, and the rooms' import rule holds."""
from pathlib import Path

from voicetune.project.architecture import arrows, figures, render, violations

from tests.conftest import ROOT


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "stages").mkdir(exist_ok=True)
    (root / "stages/s.py").write_text("from voicetune.core import a\n")
    return root


ROOMS = {
    "voicetune/__init__.py": '"""face"""\nfrom voicetune.core import a as _a\n',
    "voicetune/core/__init__.py": '"""Core."""\n',
    "voicetune/core/a.py": '"""A."""\nx = 1\n',
    "voicetune/models/__init__.py": '"""Models."""\n',
    "voicetune/models/m.py": '"""M."""\nfrom voicetune.core.a import x\n',
    "voicetune/tools/__init__.py": '"""Tools."""\n',
    "voicetune/tools/t.py": '"""T."""\nfrom voicetune.models import m\n',
}


def test_the_committed_page_is_the_one_the_code_renders():
    committed = (ROOT / "docs/architecture.md").read_text()
    assert committed == render(ROOT), "docs/architecture.md is stale: run `make architecture`"


def test_the_package_keeps_the_rooms_rule():
    assert violations(ROOT) == []


def test_a_tree_that_keeps_the_rule_has_no_violations(tmp_path):
    root = write_tree(tmp_path, ROOMS)
    assert violations(root) == []
    assert ("voicetune.tools.t", "voicetune.models.m") in arrows(root)
    assert figures(root)["modules"] == 7


def test_an_upward_import_even_inside_a_function_is_a_violation(tmp_path):
    root = write_tree(tmp_path, {**ROOMS, "voicetune/core/b.py": (
        '"""B."""\ndef f():\n    from voicetune.tools import t\n    return t\n')})
    assert violations(root) == [
        "voicetune/core/b.py imports voicetune.tools.t: room 'core' may import only nothing else"]


def test_a_module_outside_every_room_is_a_violation(tmp_path):
    root = write_tree(tmp_path, {**ROOMS, "voicetune/loose.py": '"""Loose."""\n'})
    assert violations(root) == ["voicetune/loose.py: not in a room (a subpackage of voicetune/)"]


def test_the_page_shows_each_room_arrow_and_module(tmp_path):
    page = render(write_tree(tmp_path, ROOMS))
    assert "  tools -->|1| models" in page and "  models -->|1| core" in page
    assert "  stages -->|1| core" in page
    assert "| `voicetune/models/m.py` | 2 | M. |" in page


def test_no_test_file_imports_another_test_file():
    """Shared harnesses live once, in conftest.py or tests/harness/, not in a test file that
    others import (and so run its tests' module-level setup)."""
    import ast

    offenders = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module}")
    assert offenders == []
