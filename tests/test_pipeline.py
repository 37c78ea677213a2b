"""`dvc repro` on the real dvc.yaml in a scratch copy of the project: runs, caches, reruns
only what a param change touches. The embedded model runs base_model and prepare; every stage
runs on a 2-layer random model (training the embedded one takes half an hour on 2 cores)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

SKIP = {".git", ".venv", "models", "processed", "cache", "tmp", "dvclive", "__pycache__",
        ".pytest_cache"}


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("project") / "repo"
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP])
    (dest / "dvc.lock").unlink(missing_ok=True)
    git_init(dest)
    return dest


def git_init(project: Path) -> None:
    """A repository with one commit, as a clone is (DVCLive refuses an empty one)."""
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=project, check=True, env=env)


def set_param(project: Path, section: str, key: str, value) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_then_up_to_date_then_only_prepare_reruns(project):
    first = dvc(project, "repro", "prepare")
    assert "Running stage 'base_model'" in first.stdout and "Running stage 'prepare'" in first.stdout
    for name in ("train", "valid", "test"):
        assert (project / "data/processed" / f"{name}.jsonl").stat().st_size > 0
    assert (project / "models/base/model.safetensors").exists()
    assert (project / "dvc.lock").exists()

    again = dvc(project, "repro", "prepare")
    assert "Running stage" not in again.stdout and "up to date" in again.stdout

    set_param(project, "data", "seed", 1234)
    changed = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in changed.stdout
    assert "Running stage 'base_model'" not in changed.stdout
    assert "prepare" not in dvc(project, "status", "prepare").stdout


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, tiny_model_dir) -> Path:
    """The project configured to run every stage in about a minute: a 2-layer random Llama
    (as a local model folder), 60 exchanges, a few iterations, short answers."""
    return make_tiny_project(tmp_path_factory.mktemp("tiny_project") / "repo", tiny_model_dir)


def make_tiny_project(dest: Path, model_dir: Path) -> Path:
    """A scratch copy of the project at ``dest`` with params for a fast run on ``model_dir``."""
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP])
    (dest / "dvc.lock").unlink(missing_ok=True)
    lines = (ROOT / "data/sample/tilly_brask.jsonl").read_text().splitlines()
    (dest / "data/sample/small.jsonl").write_text("\n".join(sorted(lines, key=len)[:60]) + "\n")
    git_init(dest)
    set_param(dest, "model", "source", str(model_dir))
    set_param(dest, "data", "source", "data/sample/small.jsonl")
    for key, value in {"iters": 6, "steps_per_eval": 3, "save_every": 3, "batch_size": 2,
                       "learning_rate": 3e-3}.items():
        set_param(dest, "train", key, value)
    set_param(dest, "eval", "max_tokens", 8)
    set_param(dest, "eval", "limit", 4)
    set_param(dest, "fuse", "verify_prompts", 2)
    set_param(dest, "fuse", "verify_max_tokens", 4)
    return dest


def test_full_pipeline_on_a_tiny_model(tiny_project):
    dvc(tiny_project, "repro")
    report = (tiny_project / "metrics/report.md").read_text()
    assert "| base |" in report and "| lora |" in report and "| fused |" in report
    for name in ("loss", "overlap", "lengths"):
        assert (tiny_project / f"metrics/plots/{name}.png").stat().st_size > 1000
    compare = json.loads((tiny_project / "metrics/compare.json").read_text())
    assert set(compare) == {"lora_vs_base", "fused_vs_base", "fused_vs_lora"}
    fused = json.loads((tiny_project / "metrics/fuse.json").read_text())
    assert fused["ok"] and fused["greedy_answers_identical"] == 2
    lora = json.loads((tiny_project / "metrics/eval_lora.json").read_text())
    assert lora["n"] == 4 and lora["temperature"] == 0.0 and lora["hit_token_limit"] <= 4
    shown = json.loads(dvc(tiny_project, "metrics", "show", "--json").stdout)
    assert "metrics/eval_fused.json" in json.dumps(shown)

    # changing only eval.* reruns evaluate and report, not train or fuse
    set_param(tiny_project, "eval", "max_tokens", 6)
    rerun = dvc(tiny_project, "repro").stdout
    assert all(f"Running stage 'evaluate@{m}'" in rerun for m in ("base", "lora", "fused"))
    assert "Running stage 'report'" in rerun
    assert "Running stage 'train'" not in rerun and "Running stage 'fuse'" not in rerun

    # the evaluation is deterministic: forced reruns give identical predictions and metrics
    set_param(tiny_project, "eval", "max_tokens", 8)
    dvc(tiny_project, "repro")
    before = {p: (tiny_project / p).read_bytes() for p in ("data/eval/lora.jsonl", "metrics/eval_lora.json")}
    dvc(tiny_project, "repro", "-f", "-s", "evaluate@lora")
    after = {p: (tiny_project / p).read_bytes() for p in before}
    assert after == before

    # changing lora.rank retrains and re-evaluates, but does not re-prepare the data
    set_param(tiny_project, "lora", "rank", 2)
    retrained = dvc(tiny_project, "repro").stdout
    assert "Running stage 'train'" in retrained and "Running stage 'fuse'" in retrained
    assert "Running stage 'prepare'" not in retrained and "Running stage 'base_model'" not in retrained
