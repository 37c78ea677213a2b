"""A training stage's outputs (the adapter folder, the metrics JSON, the DVCLive folder),
changed only when a run succeeds, and then each at once (written aside, moved into place).
Until then the best adapter and the DVCLive logs live in the checkpoint folder, so a failed
or killed run leaves the outputs as the last good run wrote them."""
from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path

from dvclive import Live

from voicetune.core.environment import versions
from voicetune.core.files import atomic_dir, write_json_atomic
from voicetune.train.checkpoint import Checkpoint
from voicetune.train.loop import TrainingError


class StagedOutputs:
    """``log`` writes DVCLive logs beside the checkpoint, ``commit`` puts every output in place."""

    def __init__(self, checkpoint: Checkpoint, out: str | Path, metrics: str | Path, live_dir: str | Path,
                 not_plotted: set[str]):
        self.checkpoint, self.out, self.metrics, self.live_dir = checkpoint, out, metrics, live_dir
        self.not_plotted = not_plotted  # recorded in the history and metrics, but constant
        self.staged_live = checkpoint.folder / "dvclive"  # becomes live_dir on success only
        self.live: Live | None = None

    def log(self, record: dict) -> None:
        if self.live is None:  # at the first record: after the checkpoint was loaded or discarded
            shutil.rmtree(self.staged_live, ignore_errors=True)
            self.live = Live(str(self.staged_live), resume=False, save_dvc_exp=False, dvcyaml=False)
        self.live.step = record["step"]
        for name, value in record.items():
            if name not in self.not_plotted and math.isfinite(value):
                self.live.log_metric(name, value)

    @contextmanager
    def on_failure_nothing_written(self, rank: int = 0):
        """A ``TrainingError`` inside says what is kept, and that no output changed."""
        try:
            yield
        except TrainingError as err:
            if rank:  # rank 0 says it all
                raise TrainingError(f"rank {rank}: {err}") from None
            kept = (f"the best adapter so far is {self.checkpoint.best_file}"
                    if self.checkpoint.best_file.exists() else "no adapter was saved")
            logs = f"; this run's logs are in {self.staged_live}" if self.live is not None else ""
            raise TrainingError(f"{err}\nNothing was written: {self.out}, {self.metrics} and "
                                f"{self.live_dir} are as the last successful run left them; "
                                f"{kept}{logs}") from None

    def commit(self, adapter_config: dict, model: str, summary: dict, fast_cpu: bool) -> None:
        """The best adapter (its config naming the ``model`` it adapts), the metrics
        (``summary`` and what computed it) and the logs into place; the checkpoint removed."""
        self.live.end()
        with atomic_dir(self.out) as out:
            shutil.copyfile(self.checkpoint.best_file, out / "adapters.safetensors")
            write_json_atomic(out / "adapter_config.json", {**adapter_config, "model": model})
        write_json_atomic(self.metrics, {
            **summary, "fast_cpu_kernels": fast_cpu,
            "environment": versions(),  # `dvc metrics diff` shows a library change beside its effect
        })
        with atomic_dir(self.live_dir) as out:
            shutil.copytree(self.staged_live, out, dirs_exist_ok=True)
        self.checkpoint.remove()  # finished: nothing stale is left to resume
