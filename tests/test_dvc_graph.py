"""dvc.yaml's deps are complete, checked two ways instead of remembered:
- from the code: every project module a stage's script imports, transitively (ast), is a dep;
- from a real run: every project file a stage process opened for reading is a dep, a param
  file or one of its own outs (``read_audit_env`` + ``assert_reads_covered`` of
  tests/harness/dvc_graph.py, used by the tiny end-to-end run in test_pipeline.py, so the
  pipeline runs once)."""
from __future__ import annotations

from voicetune.core.code_hash import code_fingerprint, project_imports

from tests.conftest import ROOT
from tests.harness.dvc_graph import covered, script_of, stages


def test_module_graph_follows_every_kind_of_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "stages").mkdir()
    files = {
        "pkg/__init__.py": "from . import a as _a\n",
        "pkg/a.py": "import os\n",
        "pkg/b.py": "from .c import thing\n",
        "pkg/c.py": "thing = 1\n",
        "pkg/d.py": "def f():\n    from .e import g\n",
        "pkg/e.py": "g = 1\n",
        "pkg/unused.py": "",
        "stages/s.py": "import yaml\nfrom pkg import b\nfrom pkg.d import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    found = {p.relative_to(tmp_path).as_posix() for p in project_imports(tmp_path / "stages/s.py", tmp_path)}
    assert found == set(files) - {"pkg/unused.py"}

    # the checkpoint fingerprint's code hash: every imported module counts, the others don't
    before = code_fingerprint(tmp_path / "stages/s.py", tmp_path)
    (tmp_path / "pkg/unused.py").write_text("x = 2\n")
    assert code_fingerprint(tmp_path / "stages/s.py", tmp_path) == before
    (tmp_path / "pkg/e.py").write_text("g = 2\n")  # imported inside a function, two hops away
    assert code_fingerprint(tmp_path / "stages/s.py", tmp_path) != before


def test_every_stage_depends_on_the_code_it_imports():
    missing = {}
    for name, stage in stages().items():
        code = project_imports(script_of(stage["cmd"]))
        lacking = sorted(p.relative_to(ROOT).as_posix() for p in code if not covered(p, stage["deps"]))
        if lacking:
            missing[name] = lacking
    assert not missing, "dvc.yaml: stages miss deps on code they import:\n" + "\n".join(
        f"  {name}: {', '.join(files)}" for name, files in missing.items())


def test_evaluate_lora_depends_on_the_base_model_it_loads():
    deps = stages()["evaluate@lora"]["deps"]
    assert ROOT / "models/base" in deps and ROOT / "models/adapters" in deps


def test_evaluate_foreach_is_the_model_registry():
    """dvc.yaml cannot import voicetune.models.registry, so its evaluate foreach repeats the
    table: the same models, in the same order, each on the same weights and adapters (a model
    without adapters names its weights twice)."""
    import yaml

    from voicetune.models.registry import MODELS

    foreach = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["foreach"]
    assert list(foreach) == list(MODELS), "dvc.yaml's evaluate foreach lists other models"
    for name, model in MODELS.items():
        assert foreach[name] == {"weights": model.weights, "adapters": model.adapters or model.weights}, (
            f"dvc.yaml's evaluate foreach: {name} is {foreach[name]}, the registry says "
            f"{model.weights} + {model.adapters}")
