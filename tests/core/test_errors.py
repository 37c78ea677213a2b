"""How stage scripts end (voicetune/core/errors.run_stage): a message for a UserError, and a
SIGTERM (dvc, a CI timeout, `kill`) that still cleans up the temporary outputs."""
import os
import signal
import subprocess
import sys

from tests.conftest import ROOT

# a stage that is killed half-way through writing its output folder
STAGE = """
import os, signal, sys
from voicetune.core.errors import run_stage
from voicetune.core.files import atomic_dir

def main():
    with atomic_dir("out") as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        (tmp / "never.bin").write_bytes(b"y")
    return 0

run_stage("demo", main) if sys.argv[1] == "run_stage" else main()
"""


def killed(tmp_path, how: str) -> subprocess.CompletedProcess:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/good.bin").write_bytes(b"last good")
    return subprocess.run([sys.executable, "-c", STAGE, how], cwd=tmp_path, capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_terminated_stage_removes_its_temporary_folder_and_keeps_the_last_good_output(tmp_path):
    result = killed(tmp_path, "run_stage")
    assert result.returncode == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp-* left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.bin"]


def test_without_run_stage_sigterm_leaves_the_temporary_folder(tmp_path):
    """Why run_stage handles SIGTERM: by default it ends the process before any `finally`."""
    result = killed(tmp_path, "plain")
    assert result.returncode == -signal.SIGTERM
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
