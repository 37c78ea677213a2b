"""Scratch copies of the project and `dvc` run in them: the end-to-end tests' harness."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.harness.dvc_graph import stages


SKIP = {".git", ".venv", "__pycache__", ".pytest_cache"}  # anywhere
SKIP_AT = {"models", "data/processed", "cache", "tmp", "dvclive"}  # the project's own, not voicetune/models


def dvc_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    return dict(env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")


def dvc(project: Path, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(env),
                            capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def ran(stdout: str) -> set[str]:
    """The stages a `dvc repro` ran (model_source runs every time: it is always_changed)."""
    return set(re.findall(r"Running stage '([^']+)'", stdout)) - {"model_source"}


def outputs(project: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file of every stage output (but the ``skip`` stages'), by path: the workspace's
    last good state."""
    files = {}
    for name, stage in stages(project).items():
        if name in skip:
            continue
        for out in stage["outs"]:
            for f in ([out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())):
                files[f.relative_to(project).as_posix()] = f.read_bytes()
    return files


def differing(now: dict[str, bytes], before: dict[str, bytes]) -> list[str]:
    """The paths whose bytes changed, appeared or vanished: a failure names them (comparing
    the dicts would print megabytes of file contents instead)."""
    return sorted(p for p in now.keys() | before.keys() if now.get(p) != before.get(p))


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


def copy_project(dest: Path) -> Path:
    """A copy of the repository at ``dest`` without its generated outputs, git-initialized as a
    clone is, without dvc.lock: every stage runs the first time."""
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [
        n for n in names if n in SKIP or (Path(d) / n).relative_to(ROOT).as_posix() in SKIP_AT])
    (dest / "dvc.lock").unlink(missing_ok=True)
    git_init(dest)
    return dest


def make_tiny_project(dest: Path, model_dir: Path, rewriter: str | None = None) -> Path:
    """A scratch copy of the project at ``dest`` with params for a fast run on ``model_dir``.
    ``rewriter``: the base URL of the rewrite stage's generator (a stand-in endpoint such as
    ``fakes.FakeRewriter``: a random model's paraphrases pass no check), and the task is both;
    without one the task is qa."""
    copy_project(dest)
    lines = (ROOT / "data/sample/tilly_brask.jsonl").read_text().splitlines()
    (dest / "data/sample/small.jsonl").write_text("\n".join(sorted(lines, key=len)[:60]) + "\n")
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    set_param(dest, "model", "source", str(model_dir))
    set_param(dest, "data", "source", "data/sample/small.jsonl")
    for key, value in {"iters": 6, "steps_per_eval": 3, "save_every": 3, "batch_size": 2,
                       "learning_rate": 3e-3}.items():
        set_param(dest, "train", key, value)
    set_param(dest, "eval", "max_tokens", 8)
    set_param(dest, "eval", "limit", 4)
    set_param(dest, "fuse", "verify_prompts", 2)
    set_param(dest, "fuse", "verify_max_tokens", 4)
    set_param(dest, "gguf", "verify_prompts", 1)
    for key, value in {"pairs": 8, "max_tokens": 6, "drop_cut_answers": False, "iters": 2, "batch_size": 2,
                       "steps_per_eval": 1, "save_every": 1, "max_seq_length": 256}.items():
        set_param(dest, "preference", key, value)
    for key, value in {"limit": 8, "questions": 1, "max_tokens": 8, "batch_size": 32}.items():
        set_param(dest, "ingest", key, value)
    set_param(dest, "data", "task", "both" if rewriter else "qa")
    set_param(dest, "rewrite", "endpoint", rewriter)
    set_param(dest, "eval", "rewrite_max_tokens", 10)
    return dest
