"""Supervised fine-tuning (SFT) as an objective of the training loop (``loop.train``):
mlx-lm's loss with one off-by-one fixed (``masked_loss``), the chat samples in length-sorted
batches, and the validation loss over every validation sample.

Built from mlx-lm's pieces: its datasets (chat template + prompt masking) and its gradient
checkpointing. Every sample counts: an epoch trains on every training sample once and a
validation covers every validation sample; both record how many. Validation always walks
the same batches in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from voicetune.train import loop
from voicetune.train.batching import Batch, batch_order, collate, empty_batch, epoch_order, length_sorted_batches
from voicetune.train.checkpoint import Checkpoint, run_fingerprint as fingerprint_of
from voicetune.train.loop import LoopConfig, LoopResult, Objective, TrainingError

# Part of every fingerprint: bump it when the meaning of a checkpoint's contents changes
# (2: early stopping's ``reference``; 3: one file, the report window, kernels and code), so
# that no run resumes a checkpoint it misreads.
CHECKPOINT_FORMAT = 3


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


def make_step(model, optimizer, use_grad_checkpoint: bool = False, group=None):
    """``loop.make_step`` with the SFT loss: ``step(*batch) -> (loss, ntoks)``."""
    return loop.make_step(model, optimizer, masked_loss, use_grad_checkpoint, group)


# ---------------------------------------------------------------- batches
def sample_batches(dataset, batch_size: int) -> list[list[int]]:
    """``length_sorted_batches`` of a dataset's samples by their tokenized length (mlx-lm's
    ``itemlen`` measures the raw record, 1 for a chat row)."""
    return length_sorted_batches([len(dataset[i][0]) for i in range(len(dataset))], batch_size)


def train_batches(dataset, batch_size: int, max_seq_length: int, seed: int,
                  start: int = 0, rank: int = 0, size: int = 1) -> Iterator[Batch]:
    """Endless shuffled batches, beginning after ``start`` batches already consumed. With
    ``size`` processes, each gets rows ``rank::size`` of every global batch."""
    batches = sample_batches(dataset, batch_size)
    for number in batch_order(len(batches), seed, start):
        rows = batches[number][rank::size]
        yield collate(dataset, rows, max_seq_length) if rows else empty_batch()


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
    batches = sample_batches(dataset, batch_size)
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


# ---------------------------------------------------------------- the run
@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    val_batches: int
    grad_checkpoint: bool


def resolve_iters(train: dict, n_train_samples: int) -> tuple[int, int]:
    """(iterations, batches per epoch) of a validated ``train`` section on a training split
    of ``n_train_samples``: ``train.iters`` as given, or ``train.epochs`` x the batches of
    an epoch, ceil(n / batch_size) (every sample once, the last batch maybe partial: see
    ``batching.length_sorted_batches``)."""
    if n_train_samples < 1:
        raise TrainingError("the training split is empty: nothing to train on")
    batches_per_epoch = math.ceil(n_train_samples / train["batch_size"])
    iters = train["iters"] if train.get("epochs") is None else train["epochs"] * batches_per_epoch
    return iters, batches_per_epoch


def epochs_summary(train: dict, iters: int, batches_per_epoch: int, stopped_at: int) -> dict:
    """The run's length in metrics/train.json, in iterations and in epochs: the upper bound
    (``iters``), the epochs asked for (or what ``train.iters`` makes of them) and those
    trained before the run stopped."""
    epochs = train["epochs"] if train.get("epochs") is not None else round(iters / batches_per_epoch, 3)
    return {"iters": iters, "epochs": epochs, "batches_per_epoch": batches_per_epoch,
            "epochs_trained": round(stopped_at / batches_per_epoch, 3)}


def run_fingerprint(lora: dict, train: dict, model_dir, data_dir, *, fast_cpu: bool, code: str) -> str:
    """What a resumable SFT run depends on (see ``checkpoint.run_fingerprint``)."""
    return fingerprint_of([CHECKPOINT_FORMAT, lora, train], model_dir, data_dir,
                          fast_cpu=fast_cpu, code=code)


def train(model, train_set, valid_set, cfg: TrainConfig, checkpoint: Checkpoint,
          log: Callable[[dict], None] = lambda record: None, progress_bar=None,
          group=None) -> LoopResult:
    """Train the LoRA ``model`` (already adapted and seeded) on the chat samples with
    ``loop.train``; the best adapter ends up in ``checkpoint.best_file``."""
    group = group or mx.distributed.init()
    if len(valid_set) < cfg.batch_size:
        raise TrainingError(f"the validation split has {len(valid_set)} samples, fewer than "
                            f"train.batch_size={cfg.batch_size}")

    def batches(start: int, rank: int, size: int):
        for batch in train_batches(train_set, cfg.batch_size, cfg.max_seq_length, cfg.seed,
                                   start, rank, size):
            yield batch, batch.lengths[:, 1].sum().item()

    def validate(iteration: int) -> dict:
        loss, samples, tokens = validation_stats(model, valid_set, cfg.batch_size, cfg.max_seq_length,
                                                 cfg.val_batches, group=group)
        return {"val_loss": loss, "val_perplexity": math.exp(loss) if loss < 50 else math.inf,
                "val_samples": samples, "val_tokens": tokens}

    objective = Objective(masked_loss, batches, validate, hint="Lower train.learning_rate or check the data",
                          report_trained_tokens=True, grad_checkpoint=cfg.grad_checkpoint)
    return loop.train(model, cfg, objective, checkpoint, log, progress_bar, group)
