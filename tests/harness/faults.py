"""Faults injected into a training stage run as a subprocess (the train and preference
stages both): kill -9 at a chosen point of the run (``killing``), a LoRA weight turned NaN
after a chosen validation (``poisoned_stage``), and what a run leaves on disk (``snapshot``)."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT


def stage_args(folder: Path, model_dir, data_dir, metrics: str) -> list[str]:
    return ["--params", str(folder / "params.yaml"), "--model", str(model_dir), "--data", str(data_dir),
            "--out", str(folder / "adapters"), "--metrics", str(folder / metrics),
            "--live-dir", str(folder / "live"), "--checkpoint", str(folder / "checkpoint")]


def run_stage(stage: str, metrics: str, tmp_path, model_dir, data_dir, params, name="run", wait=True,
              prefix: list[str] | None = None, root=ROOT):
    """Run ``stages/<stage>.py`` (of the project at ``root``) on ``params`` into ``tmp_path/name``,
    under the ``prefix`` script if given (``killing``, ``poisoned_stage``)."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, *(prefix or []), str(root / f"stages/{stage}.py"),
           *stage_args(folder, model_dir, data_dir, metrics)]
    env = dict(os.environ, PYTHONPATH=str(root))
    if not wait:
        return folder, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return folder, subprocess.run(cmd, env=env, capture_output=True, text=True)


# A stage run under ``python killing.py <kind> <n> <stage script> <args>``: kill -9 at a chosen
# point instead of at a chosen time. ``iteration n``: as step n begins (any checkpoint before
# it complete). ``state_write n``: right after the n-th rename onto state.safetensors, the
# moment a checkpoint's tensors are in place.
KILLING = """
import os, runpy, signal, sys
import voicetune  # before mlx: the fast BLAS
from voicetune.train import loop

kind, n = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_step_seed = loop.step_seed


def step_seed(seed, iteration, rank=0):  # called once as each step begins
    if kind == "iteration" and iteration == n:
        die()
    return real_step_seed(seed, iteration, rank)


loop.step_seed = step_seed
real_replace, state_writes = os.replace, []


def replace(src, dst, *args, **kwargs):  # pathlib's Path.replace calls it too
    real_replace(src, dst, *args, **kwargs)
    if os.path.basename(dst) == "state.safetensors":
        state_writes.append(dst)
        if kind == "state_write" and len(state_writes) == n:
            die()


os.replace = replace
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def killing(tmp_path, kill: tuple[str, int] | None) -> list[str]:
    """The prefix that runs a stage under ``KILLING`` (none if ``kill`` is None)."""
    if kill is None:
        return []
    script = tmp_path / "killing.py"
    script.write_text(KILLING)
    return [str(script), kill[0], str(kill[1])]


# ``python poisoned.py <stage script> <args>``: the stage, with its training function wrapped
# so that right after the validation at a chosen step a LoRA weight turns NaN
POISONED_STAGE = """
import math, sys
import voicetune  # before mlx: the fast BLAS
import importlib.util
from voicetune.core.errors import run_stage

spec = importlib.util.spec_from_file_location("{stage}_stage", sys.argv[1])
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
real = stage.{function}

def poisoned(model, *args, log, **kwargs):
    def poison(record):  # fault injection: after the validation at step {step} a LoRA weight turns NaN
        log(record)
        if record["step"] == {step} and "val_loss" in record:
            q_proj = model.layers[0].self_attn.q_proj
            q_proj.lora_a = q_proj.lora_a * math.nan
    return real(model, *args, log=poison, **kwargs)

stage.{function} = poisoned
sys.argv = sys.argv[1:]
run_stage("{stage}", stage.main)
"""


def poisoned_stage(tmp_path, stage: str, function: str, step: int) -> list[str]:
    """The prefix that runs ``stages/<stage>.py`` with ``function`` (its training call) poisoned
    after the validation at ``step``."""
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED_STAGE.format(stage=stage, function=function, step=step))
    return [str(script)]


def snapshot(folder: Path, metrics: str) -> dict[str, bytes]:
    """Every output file of a run in ``folder``: metrics, adapters, DVCLive logs."""
    paths = [folder / metrics, *(folder / "adapters").rglob("*"), *(folder / "live").rglob("*")]
    return {str(p.relative_to(folder)): p.read_bytes() for p in paths if p.is_file()}


def fail_after_a_good_run(run, good: dict, poisoned: dict, stage: str, function: str, step: int,
                          metrics: str):
    """``run(params, prefix=None) -> (folder, result)`` a good run, then one into the same folder
    poisoned after the validation at ``step``; checks that the failed run said so, kept its
    best adapter and changed no output. Returns (folder, the failed run's result, the outputs)."""
    folder, result = run(good)
    assert result.returncode == 0, result.stderr
    before = snapshot(folder, metrics)
    assert {metrics, "adapters/adapters.safetensors", "live/plots/metrics/val_loss.tsv"} <= before.keys()
    _, result = run(poisoned, prefix=poisoned_stage(folder.parent, stage, function, step))
    best = folder / "checkpoint/best_adapters.safetensors"
    assert result.returncode == 1, result.stderr
    assert f"the best adapter so far is {best}" in result.stderr and best.exists()
    assert "Nothing was written" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(folder, metrics) == before
    return folder, result, before
