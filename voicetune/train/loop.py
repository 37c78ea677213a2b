"""The training loop, once for every objective (SFT, DPO, ORPO), with what mlx-lm's
``tuner.train`` lacks: real early stopping, the best adapter kept, exact resume after a
crash, and non-finite losses caught. As in mlx-lm, the objective is passed in: its loss and
its batches (``Objective``); a new objective is a new loss, not a second loop.

Determinism: the objective's batches depend only on (seed, iteration); step ``i``'s random
stream (LoRA dropout) on (seed, i, rank); a checkpoint holds the adapter, the optimizer
state, the iteration, the early-stopping state and the report window, so a resumed run
computes exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint

from voicetune.core.errors import UserError
from voicetune.train.checkpoint import Checkpoint, Progress, restore_state, state_tensors
from voicetune.train.early_stopping import EarlyStopping


class TrainingError(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class LoopConfig:
    """The loop's knobs. No defaults here: ``voicetune.core.params`` fills in every default
    of params.yaml, and ``from_params`` reads a section it validated."""

    iters: int
    batch_size: int
    learning_rate: float
    optimizer: str
    steps_per_eval: int
    steps_per_report: int
    save_every: int
    max_seq_length: int
    seed: int
    patience: int
    min_delta: float

    @classmethod
    def from_params(cls, section: dict, **fixed):
        """The config of a validated params.yaml section (``train``, ``preference``), its
        ``early_stopping`` flattened in; ``fixed``: values the section has no key for."""
        values = {**section, **section["early_stopping"], **fixed}
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def make_optimizer(name: str, learning_rate: float) -> optim.Optimizer:
    choices = {"adam": optim.Adam, "adamw": optim.AdamW}
    if name.lower() not in choices:
        raise TrainingError(f"train.optimizer={name!r}: choose one of {', '.join(choices)}")
    return choices[name.lower()](learning_rate=learning_rate)


# ---------------------------------------------------------------- the objective
@dataclass
class Objective:
    """What the loop trains: a loss and its batches (mlx-lm's ``loss`` and ``iterate_batches``)
    and a validation."""

    # loss(model, *batch) -> (loss, trained tokens, *stats): the loss is differentiated, the
    # stats (named by ``stats``) are logged as train_<name>, averaged over a report window
    loss: Callable
    # batches(start, rank, size) -> endless (batch, tokens of the batch's rows), beginning
    # after ``start`` batches consumed; each process gets its rows of every batch
    batches: Callable[[int, int, int], Iterator[tuple[tuple, int]]]
    # validate(iteration) -> the record's {"val_loss": ..., ...} (the model left in eval mode)
    validate: Callable[[int], dict]
    stats: tuple[str, ...] = ()
    hint: str = ""  # what to do about a non-finite training loss
    report_trained_tokens: bool = False  # the SFT logs have trained_tokens_per_second
    grad_checkpoint: bool = False


def step_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """The random seed of one step (of one process: ranks draw their own dropout masks)."""
    key = f"{seed}:{iteration}" + (f":{rank}" if rank else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def make_step(model, optimizer, loss: Callable, use_grad_checkpoint: bool = False, group=None):
    """A compiled training step ``step(*batch) -> (loss, ntoks, *stats)`` and the state to
    evaluate after it (model, optimizer, random key).

    Across the processes of ``group`` (each holding its rows of the global batch), the loss
    and gradients are those of the whole batch: each process's mean is weighted by its
    share of the trained tokens, so the result equals one process's on the same batch (the
    stats stay each process's own).
    """
    if use_grad_checkpoint:
        grad_checkpoint(model.layers[0])
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]
    size = group.size() if group is not None else 1

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (value, ntoks, *stats), grads = loss_and_grad(model, *batch)
        if size > 1:
            total = mx.distributed.all_sum(ntoks, group=group)
            share = ntoks.astype(mx.float32) * size / total  # average_gradients divides by size
            grads = nn.average_gradients(tree_map(lambda g: g * share, grads), group=group)
            value = mx.distributed.all_sum(value * ntoks, group=group) / total
            ntoks = total
        optimizer.update(model, grads)
        return (value, ntoks, *stats)

    return step, state


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------- several processes
def broadcast(tensors: dict[str, mx.array], group) -> dict[str, mx.array]:
    """Rank 0's tensors on every process (a sum to which the other ranks add zeros)."""
    zero = group.rank() != 0
    return {k: mx.distributed.all_sum(mx.zeros_like(v) if zero else v, group=group)
            for k, v in tensors.items()}


def broadcast_json(value, group):
    """Rank 0's JSON-able ``value`` on every process."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if group.rank() == 0 else b""
    size = int(mx.distributed.all_sum(mx.array(len(data)), group=group).item())
    buffer = np.zeros(size, np.int32)
    buffer[:len(data)] = np.frombuffer(data, np.uint8) if len(data) else 0
    summed = np.array(mx.distributed.all_sum(mx.array(buffer), group=group))
    return json.loads(summed.astype(np.uint8).tobytes())


def resume(checkpoint: Checkpoint, model, optimizer, stopping: EarlyStopping, log, group
           ) -> tuple[Progress, EarlyStopping]:
    """The progress and early-stopping state to start from: the checkpoint's (its tensors
    restored into ``model`` and ``optimizer``, its records replayed into ``log``) or fresh;
    with several processes, every process gets rank 0's."""
    progress = Progress()
    resumed = checkpoint.load() if group.rank() == 0 else None
    if resumed:
        progress, tensors = resumed
        restore_state(model, optimizer, tensors)
        stopping = EarlyStopping(**progress.stopping)
        print(f"resuming from the checkpoint at iteration {progress.iteration} "
              f"(best val loss so far {stopping.best_loss:.4f} at {stopping.best_iter})")
        for record in progress.history:
            log(record)
    if group.size() > 1:  # every process starts from rank 0's state: fresh or resumed
        progress = Progress(**broadcast_json(asdict(progress), group))
        stopping = EarlyStopping(**progress.stopping) if progress.stopping else stopping
        restore_state(model, optimizer, broadcast(state_tensors(model, optimizer), group))
    return progress, stopping


# ---------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    base: dict            # the step-0 validation record (LoRA starts as the identity)
    best: dict            # the validation record of the adapter kept
    last: dict            # the last validation record
    best_iteration: int
    stopped_at: int
    stop_reason: str      # "early_stop" | "iters_done" (a non-finite loss raises TrainingError)
    resumed_from: int
    history: list
    train_seconds: float
    validation_seconds: float
    peak_memory_gb: float
    tokens_per_second: float

    def ending(self, trainable: int, total: int) -> dict:
        """How the run ended and what it trained, as a stage's metrics record them."""
        return {"stopped_at": self.stopped_at, "stop_reason": self.stop_reason,
                "resumed_from": self.resumed_from, "trainable_parameters": trainable,
                "total_parameters": total}


def train(model, cfg: LoopConfig, objective: Objective, checkpoint: Checkpoint,
          log: Callable[[dict], None] = lambda record: None, progress_bar=None,
          group=None) -> LoopResult:
    """Train the LoRA ``model`` (already adapted and seeded) on ``objective``; the best
    adapter ends up in ``checkpoint.best_file``. ``log`` receives every record (train and
    validation), replayed from the checkpoint on resume.

    Data-parallel when launched on several processes (``mlx.launch``; ``group`` defaults to
    ``mx.distributed.init()``): each process trains on its rows of every batch, gradients are
    combined as one batch's, validation is summed over all processes so that every process
    takes the same early-stopping decision, and only rank 0 writes checkpoints.
    """
    group = group or mx.distributed.init()
    rank, size = group.rank(), group.size()
    if cfg.batch_size % size:
        raise TrainingError(f"train.batch_size={cfg.batch_size} does not split evenly over "
                            f"{size} processes: make it a multiple of {size}")
    optimizer = make_optimizer(cfg.optimizer, cfg.learning_rate)
    optimizer.init(model.trainable_parameters())
    progress, stopping = resume(checkpoint, model, optimizer, EarlyStopping(cfg.patience, cfg.min_delta),
                                log, group)
    resumed_from = progress.iteration
    step, state = make_step(model, optimizer, objective.loss, objective.grad_checkpoint, group)
    timing = {"validation": 0.0}

    def record(entry: dict) -> None:
        progress.history.append(entry)
        log(entry)

    def validate(iteration: int) -> None:
        tic = time.perf_counter()
        stats = objective.validate(iteration)
        model.train()
        timing["validation"] += time.perf_counter() - tic
        loss = stats["val_loss"]
        finite = math.isfinite(loss)
        # the best adapter is saved before ``log`` sees the record: what is kept is the
        # adapter that was validated, whatever an observer of the record does
        if finite and stopping.update(loss, iteration) and rank == 0:
            checkpoint.save_best(adapter_weights(model))
        record({"step": iteration, **stats})
        if not finite:
            raise TrainingError(f"validation loss is {loss} at iteration {iteration}")

    model.train()
    if progress.iteration == 0:
        validate(0)  # LoRA starts as the identity: this is the base model's validation

    batches = objective.batches(progress.iteration, rank, size)
    window = progress.window or dict.fromkeys(["steps", "loss", *objective.stats, "tokens",
                                               "trained", "seconds"], 0)
    stop_reason, iteration = "iters_done", progress.iteration
    if progress_bar is not None:
        progress_bar.update(progress.iteration)
    for iteration in range(progress.iteration + 1, cfg.iters + 1):
        batch, tokens = next(batches)
        # The random stream (LoRA dropout) of step i is a function of (seed, i) alone, so the
        # iteration number is all the RNG state a resumed run needs.
        mx.random.seed(step_seed(cfg.seed, iteration, rank))
        tic = time.perf_counter()
        loss, ntoks, *stats = step(*batch)
        mx.eval(state, loss, ntoks, *stats)
        elapsed = time.perf_counter() - tic
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"training loss is {loss_value} at iteration {iteration}; the best adapter so "
                f"far (iteration {stopping.best_iter}, val loss {stopping.best_loss:.4f}) is "
                f"kept in {checkpoint.best_file}. {objective.hint}")
        progress.train_seconds += elapsed
        window["steps"] += 1
        window["loss"] += loss_value
        for name, value in zip(objective.stats, stats):
            window[name] += value.item()
        window["seconds"] += elapsed
        window["trained"] += ntoks.item()
        window["tokens"] += mx.distributed.all_sum(mx.array(tokens), group=group).item() if size > 1 else tokens
        if progress_bar is not None:
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{loss_value:.3f}", best_val=f"{stopping.best_loss:.3f}")

        if iteration % cfg.steps_per_report == 0 or iteration == cfg.iters:
            trained = {"trained_tokens_per_second": window["trained"] / window["seconds"]} \
                if objective.report_trained_tokens else {}
            record({"step": iteration, "train_loss": window["loss"] / window["steps"],
                    **{f"train_{name}": window[name] / window["steps"] for name in objective.stats},
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_second": window["tokens"] / window["seconds"], **trained,
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
        if iteration % cfg.save_every == 0 and iteration < cfg.iters and rank == 0:
            progress.window = dict(window)
            checkpoint.save(progress, state_tensors(model, optimizer))

    validations = {r["step"]: r for r in progress.history if "val_loss" in r}
    train_records = [r for r in progress.history if "tokens_per_second" in r]
    return LoopResult(
        base=validations[0], best=validations[stopping.best_iter],
        last=[r for r in progress.history if "val_loss" in r][-1],
        best_iteration=stopping.best_iter, stopped_at=iteration, stop_reason=stop_reason,
        resumed_from=resumed_from, history=progress.history, train_seconds=progress.train_seconds,
        validation_seconds=timing["validation"], peak_memory_gb=mx.get_peak_memory() / 1e9,
        tokens_per_second=float(np.median([r["tokens_per_second"] for r in train_records]))
        if train_records else 0.0)
