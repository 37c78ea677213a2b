"""LoRA training with what mlx-lm's ``tuner.train`` lacks: real early stopping, the best
adapter kept, exact resume after a crash, and non-finite losses caught.

Built from mlx-lm's pieces: its datasets (chat template + prompt masking), its ``evaluate``
and its gradient checkpointing; its loss with one off-by-one fixed (``masked_loss``). The loop is ours because
mlx-lm's cannot stop early, keeps the last weights and cannot resume its data order.

Determinism: the batch order of epoch ``e`` depends only on (seed, e), validation always
walks the same batches in the same order, and a checkpoint holds the adapter, the optimizer
state, the MLX random key, the iteration and the early-stopping state, so a resumed run
computes exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.trainer import evaluate, grad_checkpoint

from .files import write_json_atomic

PAD_MULTIPLE = 32  # as mlx-lm: pad each batch to a multiple of 32 tokens (+1 for the shift)


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------- loss
def masked_loss(model, tokens: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the targets at positions [offset, length) of each row.

    mlx-lm's ``default_loss`` is the same but for ``steps <= length``, which also counts one
    padding target per row (id 0 after the last token; upstream PR ml-explore/mlx-lm#1697).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)  # index of each target in the unshifted row
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ntoks = mask.sum()
    ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum() / ntoks
    return ce, ntoks


# ---------------------------------------------------------------- batches
def length_sorted_batches(dataset, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), last partial dropped."""
    order = sorted(range(len(dataset)), key=lambda i: (dataset.itemlen(i), i))
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def collate(dataset, indices: list[int], max_seq_length: int) -> tuple[mx.array, mx.array]:
    """Pad a batch; return (tokens, [[prompt_offset, length], ...]) as mlx-lm's loss expects."""
    items = [dataset[i] for i in indices]
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in items]
    width = min(1 + PAD_MULTIPLE * math.ceil(max(lengths) / PAD_MULTIPLE), max_seq_length)
    tokens = np.zeros((len(items), width), np.int32)
    for row, ((seq, _), n) in enumerate(zip(items, lengths)):
        tokens[row, :n] = seq[:n]
    offsets = [offset for _, offset in items]
    return mx.array(tokens), mx.array(list(zip(offsets, lengths)))


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def train_batches(dataset, batch_size: int, max_seq_length: int, seed: int,
                  start: int = 0) -> Iterator[tuple[mx.array, mx.array]]:
    """Endless shuffled batches, beginning after ``start`` batches already consumed."""
    batches = length_sorted_batches(dataset, batch_size)
    step = start
    while True:
        epoch, pos = divmod(step, len(batches))
        yield collate(dataset, batches[epoch_order(len(batches), seed, epoch)[pos]], max_seq_length)
        step += 1


def validation_batches(dataset, batch_size, max_seq_length, comm_group=None, **_):
    """Fixed, unshuffled validation batches (drop-in for mlx-lm's ``iterate_batches`` in
    ``evaluate``): the same numbers every time, whatever happened before."""
    batches = length_sorted_batches(dataset, batch_size)
    for i in epoch_order(len(batches), seed=0, epoch=0):
        yield collate(dataset, batches[i], max_seq_length)


def validation_loss(model, dataset, batch_size: int, max_seq_length: int, num_batches: int = -1,
                    progress: Callable | None = None) -> float:
    return evaluate(model, dataset, batch_size, num_batches, max_seq_length=max_seq_length,
                    loss=masked_loss, iterate_batches=validation_batches,
                    progress_callback=progress)


# ---------------------------------------------------------------- early stopping
@dataclass
class EarlyStopping:
    """Stop after ``patience`` consecutive evaluations without an improvement of at least
    ``min_delta`` over the best loss; the best (lowest) loss and its iteration are kept."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_iter: int = -1
    bad_evals: int = 0

    def update(self, loss: float, iteration: int) -> bool:
        """Record an evaluation; return True if it is the new best."""
        self.bad_evals = 0 if loss < self.best_loss - self.min_delta else self.bad_evals + 1
        if loss < self.best_loss:
            self.best_loss, self.best_iter = loss, iteration
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience


# ---------------------------------------------------------------- config
@dataclass
class TrainConfig:
    iters: int
    batch_size: int
    learning_rate: float
    optimizer: str = "adam"
    steps_per_eval: int = 50
    val_batches: int = -1
    grad_checkpoint: bool = False
    seed: int = 0
    max_seq_length: int = 2048
    save_every: int = 50
    patience: int = 5
    min_delta: float = 0.001
    steps_per_report: int = 10

    @classmethod
    def from_params(cls, train: dict) -> "TrainConfig":
        stopping = train.get("early_stopping", {})
        keys = {f for f in cls.__dataclass_fields__ if f in train}
        return cls(**{k: train[k] for k in keys}, patience=stopping.get("patience", 5),
                   min_delta=stopping.get("min_delta", 0.001))


def make_optimizer(name: str, learning_rate: float) -> optim.Optimizer:
    choices = {"adam": optim.Adam, "adamw": optim.AdamW}
    if name.lower() not in choices:
        raise TrainingError(f"train.optimizer={name!r}: choose one of {', '.join(choices)}")
    return choices[name.lower()](learning_rate=learning_rate)


# ---------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Everything besides tensors that a resumed run needs."""

    iteration: int = 0
    stopping: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # logged records, replayed into DVCLive
    train_seconds: float = 0.0


class Checkpoint:
    """A folder outside the stage's outputs (DVC deletes outputs before a run) holding the
    latest state and the best adapter. Written atomically; tagged with a fingerprint of
    everything that determines the run, so a run with other params never resumes it."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    @property
    def best_file(self) -> Path:
        return self.folder / "best_adapters.safetensors"

    def load(self) -> tuple[Progress, dict] | None:
        meta = self.folder / "progress.json"
        if not meta.exists():
            return None
        data = json.loads(meta.read_text())
        if data.get("fingerprint") != self.fingerprint:
            print(f"discarding checkpoint in {self.folder}: it belongs to a run with other "
                  "params, data or model")
            self.remove()
            return None
        tensors = mx.load(str(self.folder / "state.safetensors"))
        return Progress(**data["progress"]), tensors

    def save(self, progress: Progress, tensors: dict[str, mx.array]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "state.tmp.safetensors"
        mx.save_safetensors(str(tmp), tensors)
        tmp.replace(self.folder / "state.safetensors")
        # progress.json last: it is what marks the checkpoint as complete and resumable
        write_json_atomic(self.folder / "progress.json",
                          {"fingerprint": self.fingerprint, "progress": asdict(progress)})

    def save_best(self, adapters: dict[str, mx.array]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "best.tmp.safetensors"
        mx.save_safetensors(str(tmp), adapters)
        tmp.replace(self.best_file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint(*parts) -> str:
    """Hash of params (JSON-able values) and files that determine a training run."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.name.encode())
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def _state_tensors(model, optimizer) -> dict[str, mx.array]:
    tensors = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    return tensors


def _restore_state(model, optimizer, tensors: dict[str, mx.array]) -> None:
    model.load_weights([(k[6:], v) for k, v in tensors.items() if k.startswith("model.")],
                       strict=False)
    optimizer.state = tree_unflatten([(k[10:], v) for k, v in tensors.items()
                                      if k.startswith("optimizer.")])


def step_seed(seed: int, iteration: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{iteration}".encode()).digest()[:8], "little")


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    best_val_loss: float
    best_iteration: int
    base_val_loss: float
    stopped_at: int
    stop_reason: str  # "early_stop" | "iters_done" (a non-finite loss raises TrainingError)
    resumed_from: int
    history: list
    train_seconds: float
    peak_memory_gb: float
    tokens_per_second: float


def train(model, train_set, valid_set, cfg: TrainConfig, checkpoint: Checkpoint,
          log: Callable[[dict], None] = lambda record: None, progress_bar=None) -> TrainResult:
    """Train the LoRA ``model`` (already adapted and seeded); the best adapter ends up in
    ``checkpoint.best_file``. ``log`` receives every record (train and validation)."""
    if len(valid_set) < cfg.batch_size:
        raise TrainingError(f"the validation split has {len(valid_set)} samples, fewer than "
                            f"train.batch_size={cfg.batch_size}")
    optimizer = make_optimizer(cfg.optimizer, cfg.learning_rate)
    optimizer.init(model.trainable_parameters())
    stopping = EarlyStopping(cfg.patience, cfg.min_delta)
    progress = Progress()

    resumed = checkpoint.load()
    if resumed:
        progress, tensors = resumed
        _restore_state(model, optimizer, tensors)
        stopping = EarlyStopping(**progress.stopping)
        print(f"resuming from the checkpoint at iteration {progress.iteration} "
              f"(best val loss so far {stopping.best_loss:.4f} at {stopping.best_iter})")
        for record in progress.history:
            log(record)
    resumed_from = progress.iteration

    if cfg.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, lengths):
        (loss, ntoks), grads = loss_and_grad(model, tokens, lengths)
        optimizer.update(model, grads)
        return loss, ntoks

    def record(entry: dict) -> None:
        progress.history.append(entry)
        log(entry)

    def validate(iteration: int) -> float:
        loss = validation_loss(model, valid_set, cfg.batch_size, cfg.max_seq_length, cfg.val_batches)
        model.train()
        entry = {"step": iteration, "val_loss": loss,
                 "val_perplexity": math.exp(loss) if loss < 50 else math.inf}
        record(entry)
        if not math.isfinite(loss):
            raise TrainingError(f"validation loss is {loss} at iteration {iteration}")
        if stopping.update(loss, iteration):
            checkpoint.save_best(adapter_weights(model))
        return loss

    model.train()
    if progress.iteration == 0:
        validate(0)  # LoRA starts as the identity: this is the base model's validation loss
    base_val_loss = progress.history[0]["val_loss"]

    batches = train_batches(train_set, cfg.batch_size, cfg.max_seq_length, cfg.seed,
                            start=progress.iteration)
    window = {"steps": 0, "loss": 0.0, "tokens": 0, "trained": 0, "seconds": 0.0}
    stop_reason, iteration = "iters_done", progress.iteration
    if progress_bar is not None:
        progress_bar.update(progress.iteration)
    for iteration in range(progress.iteration + 1, cfg.iters + 1):
        tokens, lengths = next(batches)
        # The random stream (LoRA dropout) of step i is a function of (seed, i) alone, so the
        # iteration number is all the RNG state a resumed run needs.
        mx.random.seed(step_seed(cfg.seed, iteration))
        tic = time.perf_counter()
        loss, ntoks = step(tokens, lengths)
        mx.eval(state, loss, ntoks)
        elapsed = time.perf_counter() - tic
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"training loss is {loss_value} at iteration {iteration}; the best adapter so "
                f"far (iteration {stopping.best_iter}, val loss {stopping.best_loss:.4f}) is "
                "kept. Lower train.learning_rate or check the data")
        progress.train_seconds += elapsed
        window["steps"] += 1
        window["loss"] += loss_value
        window["seconds"] += elapsed
        window["trained"] += ntoks.item()
        window["tokens"] += int(lengths[:, 1].sum().item())
        if progress_bar is not None:
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{loss_value:.3f}", best_val=f"{stopping.best_loss:.3f}")

        if iteration % cfg.steps_per_report == 0 or iteration == cfg.iters:
            record({"step": iteration, "train_loss": window["loss"] / window["steps"],
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_second": window["tokens"] / window["seconds"],
                    "trained_tokens_per_second": window["trained"] / window["seconds"],
                    "seconds_per_iteration": window["seconds"] / window["steps"],
                    "peak_memory_gb": mx.get_peak_memory() / 1e9})
            window = dict.fromkeys(window, 0)

        if iteration % cfg.steps_per_eval == 0 or iteration == cfg.iters:
            validate(iteration)
        progress.iteration = iteration
        progress.stopping = asdict(stopping)
        if stopping.should_stop:
            stop_reason = "early_stop"
            break
        if iteration % cfg.save_every == 0 and iteration < cfg.iters:
            checkpoint.save(progress, _state_tensors(model, optimizer))

    train_records = [r for r in progress.history if "tokens_per_second" in r]
    return TrainResult(
        best_val_loss=stopping.best_loss, best_iteration=stopping.best_iter,
        base_val_loss=base_val_loss, stopped_at=iteration, stop_reason=stop_reason,
        resumed_from=resumed_from, history=progress.history,
        train_seconds=progress.train_seconds, peak_memory_gb=mx.get_peak_memory() / 1e9,
        tokens_per_second=float(np.median([r["tokens_per_second"] for r in train_records]))
        if train_records else 0.0,
    )
