"""`dvc repro` on the real dvc.yaml in a scratch copy of the project: runs, caches, reruns
only what a param change touches. (Stages past prepare train the embedded model for many
minutes: for them the test asks `dvc repro --dry` what would run.)"""
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
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


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


def test_lora_change_reruns_train_but_not_prepare(project):
    dvc(project, "repro", "prepare")
    set_param(project, "lora", "rank", 8)
    dry = dvc(project, "repro", "--dry").stdout
    assert "Running stage 'train'" in dry
    assert "Running stage 'prepare'" not in dry and "Running stage 'base_model'" not in dry
