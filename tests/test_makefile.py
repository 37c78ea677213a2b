"""The Makefile passes every value on to the tools quoted: a value is one argument, never shell.

The targets run against a stand-in venv whose ``python`` and ``dvc`` only record the
arguments they were given (``python -c`` runs the real interpreter: the Makefile splits ARGS
with it), so nothing here publishes, serves or trains.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

RECORDER = """#!/bin/sh
if [ "$1" = -c ]; then exec {python} "$@"; fi
{python} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' {name} "$@" >> "$RECORD"
exit "${{FAKE_RC:-0}}"
"""


@pytest.fixture
def venv(tmp_path) -> Path:
    """A venv that `make setup` takes as installed, with recording python and dvc."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "dvc"):
        tool = venv / "bin" / name
        tool.write_text(RECORDER.format(python=sys.executable, name=name))
        tool.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml and the locks
    return venv


def make(venv: Path, cwd: Path, *args: str, **env) -> tuple[subprocess.CompletedProcess, list]:
    record = cwd / "record.jsonl"
    record.unlink(missing_ok=True)
    done = subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"),
                           f"VENV={venv}", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, RECORD=str(record), **env))
    calls = [json.loads(line) for line in record.read_text().splitlines()] \
        if record.exists() else []
    return done, calls


def test_a_value_with_shell_in_it_is_one_argument(venv, tmp_path):
    done, calls = make(venv, tmp_path, "publish", f"REPO=a/b;touch {tmp_path}/HACKED", "DRY_RUN=1")
    assert done.returncode == 0, done.stderr
    assert calls == [["python", "-m", "voicetune.tools.publish", "--repo", f"a/b;touch {tmp_path}/HACKED",
                      "--what", "adapters", "--dry-run"]]
    assert not (tmp_path / "HACKED").exists()


def test_a_repo_name_with_a_space_gets_the_projects_message(tmp_path):
    """The real venv: publish's own OWNER/NAME check, not argparse's "unrecognized arguments"."""
    done = subprocess.run(["make", "--no-print-directory", "publish", "REPO=bad name",
                           "DRY_RUN=1"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "publish: --repo 'bad name' is not a hub repo id: use OWNER/NAME" in done.stderr
    assert "unrecognized arguments" not in done.stderr


def test_args_are_split_like_a_shell_but_never_run(venv, tmp_path):
    args = f'--host 0.0.0.0 --question "two words" `touch {tmp_path}/A` $$(touch {tmp_path}/B)'
    done, calls = make(venv, tmp_path, "arena", "PORT=7861", f"ARGS={args}")
    assert done.returncode == 0, done.stderr
    assert calls == [["python", "-m", "voicetune.tools.arena", "--port", "7861", "--host", "0.0.0.0",
                      "--question", "two words", "`touch", f"{tmp_path}/A`", "$(touch",
                      f"{tmp_path}/B)"]]
    assert list(tmp_path.glob("[AB]")) == []


def test_unbalanced_quotes_in_args_are_refused_before_the_tool_runs(venv, tmp_path):
    done, calls = make(venv, tmp_path, "chat", "ARGS=--model 'lora")
    assert done.returncode != 0
    assert "make: ARGS=\"--model 'lora\": No closing quotation" in done.stderr
    assert calls == []


@pytest.mark.parametrize("target,variables,argv", [
    ("recipe", ["R=my blog;x"], ["-m", "voicetune.tools.recipe", "recipes/my blog;x.yaml"]),
    ("runs", ["N=2 3"], ["-m", "voicetune.tools.runs", "-n", "2 3"]),
    ("chat", ["COMPARE=base,lora x"], ["-m", "voicetune.tools.chat", "--compare", "base,lora x"]),
    ("chat", ["MODEL=it's"], ["-m", "voicetune.tools.chat", "--model", "it's"]),
    ("publish", ["REPO=a/b", "WHAT=x y", "LICENSE=l;m", "BASE_MODEL=o/n p", "OUT=d i r"],
     ["-m", "voicetune.tools.publish", "--repo", "a/b", "--what", "x y", "--license", "l;m",
      "--base-model", "o/n p", "--out", "d i r"]),
])
def test_every_variable_a_target_passes_on_is_one_argument(venv, tmp_path, target, variables,
                                                           argv):
    done, calls = make(venv, tmp_path, target, *variables)
    assert done.returncode == 0, done.stderr
    assert calls == [["python", *argv]]


@pytest.mark.parametrize("preflight_rc,expected", [
    ("1", [["python", "-m", "voicetune.tools.preflight"]]),
    ("0", [["python", "-m", "voicetune.tools.preflight"], ["dvc", "repro"]]),
])
def test_make_repro_runs_the_preflight_first_and_stops_on_its_verdict(venv, tmp_path,
                                                                      preflight_rc, expected):
    done, calls = make(venv, tmp_path, "repro", FAKE_RC=preflight_rc)
    assert (done.returncode == 0) == (preflight_rc == "0")
    assert calls == expected
