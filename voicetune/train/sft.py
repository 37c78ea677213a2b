"""LoRA training with what mlx-lm's ``tuner.train`` lacks: real early stopping, the best
adapter kept, exact resume after a crash, and non-finite losses caught.

Built from mlx-lm's pieces: its datasets (chat template + prompt masking), its ``evaluate``
and its gradient checkpointing; its loss with one off-by-one fixed (``masked_loss``). The loop is ours because
mlx-lm's cannot stop early, keeps the last weights and cannot resume its data order.

Every sample counts: an epoch trains on every training sample once (its last batch may be
partial) and a validation covers every validation sample; both record how many.

Determinism: the batch order of epoch ``e`` depends only on (seed, e), validation always
walks the same batches in the same order, and a checkpoint holds the adapter, the optimizer
state, the MLX random key, the iteration and the early-stopping state, so a resumed run
computes exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import grad_checkpoint

from voicetune.core.errors import UserError

PAD_MULTIPLE = 32  # as mlx-lm: pad each batch to a multiple of 32 tokens (+1 for the shift)


class TrainingError(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------- loss
# Architectures whose forward is exactly ``head(model.model(inputs))``: for these the loss
# projects onto the vocabulary only the positions it trains on (see ``masked_loss``).
_PLAIN_HEAD_TYPES = {"llama", "phi3", "qwen2", "mistral"}


def vocabulary_head(model) -> Callable | None:
    """The output projection of ``model`` if its logits are ``head(model.model(x))``, else None."""
    if getattr(model, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear
    return model.lm_head


class Batch(NamedTuple):
    """A padded batch. ``target_index`` lists the flattened (row * (width - 1) + position)
    indices of the trained targets, padded to a multiple of PAD_MULTIPLE with weight 0."""

    tokens: mx.array          # (B, width) token ids, zero-padded
    lengths: mx.array         # (B, 2): [prompt offset, length] as mlx-lm's loss expects
    target_index: mx.array    # (K,) int32
    target_weight: mx.array   # (K,) float32, 1 for real targets, 0 for padding


def masked_loss(model, tokens: mx.array, lengths: mx.array, target_index: mx.array | None = None,
                target_weight: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the targets at positions [offset, length) of each row.

    mlx-lm's ``default_loss`` is the same but for ``steps <= length``, which also counts one
    padding target per row (id 0 after the last token; upstream PR ml-explore/mlx-lm#1697).

    Given ``target_index``/``target_weight`` (see ``Batch``), only the trained positions go
    through the vocabulary projection and the softmax: with a 49k vocabulary and the prompt
    masked, that skips over half of the most expensive elementwise work on a CPU.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    head = vocabulary_head(model) if target_index is not None else None
    if head is None:
        logits = model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)  # index of each target in the unshifted row
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
        ntoks = mask.sum()
        # max(.., 1): an empty batch (see ``empty_batch``) has loss 0 and zero gradients, not NaN
        ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum() / mx.maximum(ntoks, 1)
        return ce, ntoks
    hidden = model.model(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[target_index]
    logits = head(hidden)
    ce = nn.losses.cross_entropy(logits, targets.reshape(-1)[target_index]).astype(mx.float32)
    ntoks = (target_weight > 0).sum()
    return (ce * target_weight).sum() / mx.maximum(ntoks, 1), ntoks


# ---------------------------------------------------------------- batches
def length_sorted_batches(dataset, batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar token length (less padding). Every sample is
    in one batch: the last, partial one holds the longest samples, so dropping it would bias
    validation towards short answers. (mlx-lm's ``itemlen`` measures the raw record, 1 for a
    chat row, so the lengths are the tokenized ones.)"""
    lengths = [len(dataset[i][0]) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def empty_batch() -> Batch:
    """A batch that trains nothing: one row of padding, every target weight 0. A process
    gets it when a partial batch has fewer rows than there are processes, so that it still
    joins the step's collective operations, with zero loss, tokens and gradients."""
    return Batch(mx.zeros((1, PAD_MULTIPLE + 1), mx.int32), mx.array([[0, 0]], mx.int32),
                 mx.zeros((PAD_MULTIPLE,), mx.int32), mx.zeros((PAD_MULTIPLE,), mx.float32))


def collate(dataset, indices: list[int], max_seq_length: int) -> Batch:
    """Pad a batch to a multiple of PAD_MULTIPLE (+1 for the shift) and index its targets."""
    items = [dataset[i] for i in indices]
    lengths = [min(len(tokens), max_seq_length) for tokens, _ in items]
    width = min(1 + PAD_MULTIPLE * math.ceil(max(lengths) / PAD_MULTIPLE), max_seq_length)
    tokens = np.zeros((len(items), width), np.int32)
    for row, ((seq, _), n) in enumerate(zip(items, lengths)):
        tokens[row, :n] = seq[:n]
    offsets = [offset for _, offset in items]
    return Batch(mx.array(tokens), mx.array(list(zip(offsets, lengths))),
                 *target_index(offsets, lengths, width))


def target_index(offsets: list[int], lengths: list[int], width: int) -> tuple[mx.array, mx.array]:
    """``Batch.target_index`` and ``target_weight`` of rows padded to ``width`` tokens."""
    # target t of row r sits at position t - 1 of the shifted row: offset <= t < length
    index = np.concatenate([row * (width - 1) + np.arange(max(offset, 1) - 1, n - 1)
                            for row, (offset, n) in enumerate(zip(offsets, lengths))])
    padded = PAD_MULTIPLE * max(1, math.ceil(len(index) / PAD_MULTIPLE))
    weight = np.zeros(padded, np.float32)
    weight[:len(index)] = 1
    return mx.array(np.pad(index, (0, padded - len(index))).astype(np.int32)), mx.array(weight)


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def train_batches(dataset, batch_size: int, max_seq_length: int, seed: int,
                  start: int = 0, rank: int = 0, size: int = 1) -> Iterator[Batch]:
    """Endless shuffled batches, beginning after ``start`` batches already consumed. With
    ``size`` processes, each gets rows ``rank::size`` of every global batch."""
    batches = length_sorted_batches(dataset, batch_size)
    step = start
    while True:
        epoch, pos = divmod(step, len(batches))
        rows = batches[epoch_order(len(batches), seed, epoch)[pos]][rank::size]
        yield collate(dataset, rows, max_seq_length) if rows else empty_batch()
        step += 1


class Validation(NamedTuple):
    loss: float    # mean cross-entropy over every trained token
    samples: int   # samples covered (all processes together)
    tokens: int    # trained tokens covered


def validation_stats(model, dataset, batch_size: int, max_seq_length: int, num_batches: int = -1,
                     progress: Callable | None = None, group=None) -> Validation:
    """The loss over the whole ``dataset`` (or its first ``num_batches`` batches), in fixed,
    unshuffled batches: the same numbers every time, whatever happened before, and whatever
    the number of processes (each takes rows ``rank::size`` of every batch; the sums of all
    processes are combined). Unlike mlx-lm's ``evaluate``, a process may get no rows of a
    batch: it then adds nothing instead of 0/0."""
    group = group or mx.distributed.init()
    rank, size = group.rank(), group.size()
    model.eval()
    batches = length_sorted_batches(dataset, batch_size)
    order = epoch_order(len(batches), seed=0, epoch=0)
    order = order if num_batches == -1 else order[:num_batches]
    loss_sum, tokens, samples = mx.array(0.0), mx.array(0), 0
    for i in order:
        rows = batches[i][rank::size]
        if rows:
            loss, ntoks = masked_loss(model, *collate(dataset, rows, max_seq_length))
            loss_sum, tokens = loss_sum + loss * ntoks, tokens + ntoks
            mx.eval(loss_sum, tokens)
        samples += len(batches[i])  # the whole batch, counted the same on every process
        if progress is not None:
            progress()
    if size > 1:
        loss_sum = mx.distributed.all_sum(loss_sum, group=group, stream=mx.cpu)
        tokens = mx.distributed.all_sum(tokens, group=group, stream=mx.cpu)
    return Validation((loss_sum / tokens).item(), samples, tokens.item())


def validation_loss(model, dataset, batch_size: int, max_seq_length: int, num_batches: int = -1,
                    progress: Callable | None = None) -> float:
    return validation_stats(model, dataset, batch_size, max_seq_length, num_batches, progress).loss


# ---------------------------------------------------------------- early stopping
@dataclass
class EarlyStopping:
    """Stop after ``patience`` consecutive evaluations without a significant improvement:
    a loss below ``reference - min_delta``, where the reference is the loss of the last
    significant improvement (Keras' and Lightning's rule). The reference moves only then, so
    small steps that add up to more than ``min_delta`` count; moving it on every step would
    stop a run that improves steadily by a little less than ``min_delta`` per evaluation.
    Apart from that, the lowest loss and its iteration are kept: that is the adapter saved."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_iter: int = -1
    bad_evals: int = 0
    reference: float = math.inf

    def update(self, loss: float, iteration: int) -> bool:
        """Record an evaluation; return True if it is the new best (lowest) loss."""
        if loss < self.reference - self.min_delta:
            self.reference, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
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
    # the train loop's report window so far (sums since the last report): a checkpoint
    # between two reports must not restart the next report's mean
    window: dict = field(default_factory=dict)


class Checkpoint:
    """A folder outside the stage's outputs holding the latest state and the best adapter
    (and, in the train stage, the DVCLive logs until the run succeeds). Tagged with a
    fingerprint of everything that determines the run (``run_fingerprint``), so a run with
    other params, data, model, kernels or code never resumes it.

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
        self.best = dict(adapters)
        tmp = self.folder / "best.tmp.safetensors"
        mx.save_safetensors(str(tmp), adapters)
        os.replace(tmp, self.best_file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# Part of every fingerprint: bump it when the meaning of a checkpoint's contents changes
# (2: early stopping's ``reference``; 3: one file, the report window, kernels and code), so
# that no run resumes a checkpoint it misreads.
CHECKPOINT_FORMAT = 3


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


def run_fingerprint(lora: dict, train: dict, model_dir: str | Path, data_dir: str | Path, *,
                    fast_cpu: bool, code: str) -> str:
    """The fingerprint of a training run: params, every model file's contents (a changed
    byte of the weights or of the chat template is another run), the data it reads, and what
    computes each step: whether the fast CPU kernels are on (``fastpath.enable``'s answer,
    not the setting: ``auto`` means other numbers on other machines) and the code
    (``code_hash.code_fingerprint`` of the stage script)."""
    root, data = Path(model_dir), Path(data_dir)
    return fingerprint(CHECKPOINT_FORMAT, lora, train, {"fast_cpu": bool(fast_cpu), "code": code},
                       *[x for p in model_files(root) for x in (p.relative_to(root).as_posix(), p)],
                       data / "train.jsonl", data / "valid.jsonl")


def _state_tensors(model, optimizer) -> dict[str, mx.array]:
    tensors = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    tensors.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    return tensors


def _restore_state(model, optimizer, tensors: dict[str, mx.array]) -> None:
    model.load_weights([(k[6:], v) for k, v in tensors.items() if k.startswith("model.")],
                       strict=False)
    optimizer.state = tree_unflatten([(k[10:], v) for k, v in tensors.items()
                                      if k.startswith("optimizer.")])


def step_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """The random seed of one step (of one process: ranks draw their own dropout masks)."""
    key = f"{seed}:{iteration}" + (f":{rank}" if rank else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


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


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def make_step(model, optimizer, use_grad_checkpoint: bool = False, group=None):
    """A compiled training step ``step(*batch) -> (loss, ntoks)`` and the state to evaluate
    after it (model, optimizer, random key).

    Across the processes of ``group`` (each holding its rows of the global batch), the loss
    and gradients are those of the whole batch: each process's mean is weighted by its
    share of the trained tokens, so the result equals one process's on the same batch.
    """
    if use_grad_checkpoint:
        grad_checkpoint(model.layers[0])
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state, mx.random.state]
    size = group.size() if group is not None else 1

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (loss, ntoks), grads = loss_and_grad(model, *batch)
        if size > 1:
            total = mx.distributed.all_sum(ntoks, group=group)
            share = ntoks.astype(mx.float32) * size / total  # average_gradients divides by size
            grads = nn.average_gradients(tree_map(lambda g: g * share, grads), group=group)
            loss = mx.distributed.all_sum(loss * ntoks, group=group) / total
            ntoks = total
        optimizer.update(model, grads)
        return loss, ntoks

    return step, state


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
    val_samples: int   # what each validation covered
    val_tokens: int


def train(model, train_set, valid_set, cfg: TrainConfig, checkpoint: Checkpoint,
          log: Callable[[dict], None] = lambda record: None, progress_bar=None,
          group=None) -> TrainResult:
    """Train the LoRA ``model`` (already adapted and seeded); the best adapter ends up in
    ``checkpoint.best_file``. ``log`` receives every record (train and validation).

    Data-parallel when launched on several processes (``mlx.launch``; ``group`` defaults to
    ``mx.distributed.init()``): each process trains on its rows of every batch, gradients are
    combined as one batch's, validation is summed over all processes so that every process
    takes the same early-stopping decision, and only rank 0 writes checkpoints.
    """
    group = group or mx.distributed.init()
    rank, size = group.rank(), group.size()
    if len(valid_set) < cfg.batch_size:
        raise TrainingError(f"the validation split has {len(valid_set)} samples, fewer than "
                            f"train.batch_size={cfg.batch_size}")
    if cfg.batch_size % size:
        raise TrainingError(f"train.batch_size={cfg.batch_size} does not split evenly over "
                            f"{size} processes: make it a multiple of {size}")
    optimizer = make_optimizer(cfg.optimizer, cfg.learning_rate)
    optimizer.init(model.trainable_parameters())
    stopping = EarlyStopping(cfg.patience, cfg.min_delta)
    progress = Progress()

    resumed = checkpoint.load() if rank == 0 else None
    if resumed:
        progress, tensors = resumed
        _restore_state(model, optimizer, tensors)
        stopping = EarlyStopping(**progress.stopping)
        print(f"resuming from the checkpoint at iteration {progress.iteration} "
              f"(best val loss so far {stopping.best_loss:.4f} at {stopping.best_iter})")
        for record in progress.history:
            log(record)
    if size > 1:  # every process starts from rank 0's state: fresh or resumed
        progress = Progress(**broadcast_json(asdict(progress), group))
        stopping = EarlyStopping(**progress.stopping) if progress.stopping else stopping
        _restore_state(model, optimizer, broadcast(_state_tensors(model, optimizer), group))
    resumed_from = progress.iteration

    step, state = make_step(model, optimizer, cfg.grad_checkpoint, group)

    def record(entry: dict) -> None:
        progress.history.append(entry)
        log(entry)

    def validate(iteration: int) -> float:
        loss, samples, tokens = validation_stats(model, valid_set, cfg.batch_size, cfg.max_seq_length,
                                                 cfg.val_batches, group=group)
        model.train()
        entry = {"step": iteration, "val_loss": loss,
                 "val_perplexity": math.exp(loss) if loss < 50 else math.inf,
                 "val_samples": samples, "val_tokens": tokens}
        record(entry)
        if not math.isfinite(loss):
            raise TrainingError(f"validation loss is {loss} at iteration {iteration}")
        if stopping.update(loss, iteration) and rank == 0:
            checkpoint.save_best(adapter_weights(model))
        return loss

    model.train()
    if progress.iteration == 0:
        validate(0)  # LoRA starts as the identity: this is the base model's validation loss
    base_val_loss = progress.history[0]["val_loss"]

    batches = train_batches(train_set, cfg.batch_size, cfg.max_seq_length, cfg.seed,
                            start=progress.iteration, rank=rank, size=size)
    window = progress.window or {"steps": 0, "loss": 0.0, "tokens": 0, "trained": 0, "seconds": 0.0}
    stop_reason, iteration = "iters_done", progress.iteration
    if progress_bar is not None:
        progress_bar.update(progress.iteration)
    for iteration in range(progress.iteration + 1, cfg.iters + 1):
        batch = next(batches)
        # The random stream (LoRA dropout) of step i is a function of (seed, i) alone, so the
        # iteration number is all the RNG state a resumed run needs.
        mx.random.seed(step_seed(cfg.seed, iteration, rank))
        tic = time.perf_counter()
        loss, ntoks = step(*batch)
        mx.eval(state, loss, ntoks)
        elapsed = time.perf_counter() - tic
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"training loss is {loss_value} at iteration {iteration}; the best adapter so "
                f"far (iteration {stopping.best_iter}, val loss {stopping.best_loss:.4f}) is "
                f"kept in {checkpoint.best_file}. Lower train.learning_rate or check the data")
        progress.train_seconds += elapsed
        window["steps"] += 1
        window["loss"] += loss_value
        window["seconds"] += elapsed
        window["trained"] += ntoks.item()
        tokens = batch.lengths[:, 1].sum()
        window["tokens"] += (mx.distributed.all_sum(tokens, group=group) if size > 1 else tokens).item()
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
        if iteration % cfg.save_every == 0 and iteration < cfg.iters and rank == 0:
            progress.window = dict(window)
            checkpoint.save(progress, _state_tensors(model, optimizer))

    train_records = [r for r in progress.history if "tokens_per_second" in r]
    last_val = [r for r in progress.history if "val_loss" in r][-1]
    return TrainResult(
        best_val_loss=stopping.best_loss, best_iteration=stopping.best_iter,
        base_val_loss=base_val_loss, stopped_at=iteration, stop_reason=stop_reason,
        resumed_from=resumed_from, history=progress.history,
        train_seconds=progress.train_seconds, peak_memory_gb=mx.get_peak_memory() / 1e9,
        tokens_per_second=float(np.median([r["tokens_per_second"] for r in train_records]))
        if train_records else 0.0,
        val_samples=last_val.get("val_samples", 0), val_tokens=last_val.get("val_tokens", 0),
    )
