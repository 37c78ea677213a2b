"""Crash-safe checkpoints: one atomic ``state.safetensors`` holding the tensors (model,
optimizer, best adapter so far) with the progress and the run's fingerprint in its metadata,
and the fingerprint that decides whether a checkpoint belongs to this run."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


@dataclass
class Progress:
    """Everything besides tensors that a resumed run needs."""

    iteration: int = 0
    stopping: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # logged records, replayed into DVCLive
    train_seconds: float = 0.0
    # the train loop's report window so far (sums since the last report): a checkpoint
    # between two reports must not restart the next report's mean
    window: dict = field(default_factory=dict)


class Checkpoint:
    """A folder outside the stage's outputs holding the latest state and the best adapter
    (and the DVCLive logs until the run succeeds). Tagged with a fingerprint of everything
    that determines the run (``run_fingerprint``), so a run with other params, data, model,
    kernels or code never resumes it.

    One file is the checkpoint: ``state.safetensors`` holds the tensors (model, optimizer,
    and the best adapter so far) with the progress and the fingerprint in its metadata, and
    is replaced in one ``os.replace``. A kill at any moment leaves the old checkpoint or the
    new one, never new tensors beside old progress (iteration, early stopping)."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.best: dict[str, mx.array] | None = None  # saved with every checkpoint

    @property
    def best_file(self) -> Path:
        return self.folder / "best_adapters.safetensors"

    @property
    def state_file(self) -> Path:
        return self.folder / "state.safetensors"

    def load(self) -> tuple[Progress, dict] | None:
        # a save killed before its rename leaves its temporary file: never a checkpoint
        for stale in self.folder.glob("*.tmp.safetensors"):
            stale.unlink(missing_ok=True)
        if not self.state_file.exists():
            return None
        tensors, meta = mx.load(str(self.state_file), return_metadata=True)
        if meta.get("fingerprint") != self.fingerprint:
            print(f"discarding checkpoint in {self.folder}: it belongs to a run with other "
                  "params, data, model, kernels or code")
            self.remove()
            return None
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        if best:  # the best adapter as of this checkpoint, whatever a later, killed run wrote
            self.save_best(best)
        return (Progress(**json.loads(meta["progress"])),
                {k: v for k, v in tensors.items() if not k.startswith("best.")})

    def save(self, progress: Progress, tensors: dict[str, mx.array]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {**tensors, **{f"best.{k}": v for k, v in (self.best or {}).items()}}
        tmp = self.folder / "state.tmp.safetensors"
        mx.save_safetensors(str(tmp), tensors, metadata={
            "fingerprint": self.fingerprint, "progress": json.dumps(asdict(progress))})
        os.replace(tmp, self.state_file)  # the commit: before it the old checkpoint, after it the new

    def save_best(self, adapters: dict[str, mx.array]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # by name: MLX lays a file's tensors out in the order they are given, and the best
        # adapter comes from the model (a run) or from a checkpoint's file (a resumed run):
        # one order gives a resumed run the uninterrupted run's bytes
        self.best = dict(sorted(adapters.items()))
        tmp = self.folder / "best.tmp.safetensors"
        mx.save_safetensors(str(tmp), self.best)
        os.replace(tmp, self.best_file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def state_tensors(model, optimizer) -> dict[str, mx.array]:
    """What a checkpoint holds of a run: the trainable weights and the optimizer state."""
    tensors = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    return tensors


def restore_state(model, optimizer, tensors: dict[str, mx.array]) -> None:
    model.load_weights([(k[6:], v) for k, v in tensors.items() if k.startswith("model.")],
                       strict=False)
    optimizer.state = tree_unflatten([(k[10:], v) for k, v in tensors.items()
                                      if k.startswith("optimizer.")])


# ---------------------------------------------------------------- what a checkpoint belongs to
def fingerprint(*parts) -> str:
    """Hash of params (JSON-able values) and files (their name and whole contents, streamed)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(b"file\0" + part.name.encode() + b"\0")
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(b"json\0" + json.dumps(part, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def model_files(model_dir: str | Path) -> list[Path]:
    """The files of a model folder that a checkpoint depends on: every non-hidden file, so
    the weights, config.json, the tokenizer and the chat template (tokenizer_config.json,
    chat_template.jinja) are all covered by content, whatever the model ships."""
    root = Path(model_dir)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def run_fingerprint(params: list, model_dir: str | Path, data_dir: str | Path, *,
                    fast_cpu: bool, code: str) -> str:
    """The fingerprint of a training run: ``params`` (the stage's tag, its checkpoint
    format and its params), every model file's contents (a changed byte of the weights or
    of the chat template is another run), the data it reads (train.jsonl, valid.jsonl),
    and what computes each step: whether the fast CPU kernels are on (``kernels.enable``'s
    answer, not the setting: ``auto`` means other numbers on other machines) and the code
    (``code_hash.code_fingerprint`` of the stage script)."""
    root, data = Path(model_dir), Path(data_dir)
    return fingerprint(*params, {"fast_cpu": bool(fast_cpu), "code": code},
                       *[x for p in model_files(root) for x in (p.relative_to(root).as_posix(), p)],
                       data / "train.jsonl", data / "valid.jsonl")
