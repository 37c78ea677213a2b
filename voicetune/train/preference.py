"""Preference tuning (DPO, ORPO) of new LoRA adapters on the fused SFT model, as an
objective of the training loop (``loop.train``: validation with real early stopping, the
best adapter kept, checkpoints and exact resume, non-finite losses caught).

One model in memory. The policy is models/fused plus new LoRA layers; the reference policy
is the same weights with those layers switched off. LoRA's B matrices start at zero, so at
step 0 the policy *is* the reference: the reference log-probabilities are computed once,
before the first step, for every train and valid pair, in the batches that training and
validation use (so DPO's step-0 validation is the reference's own numbers, a loss of log 2),
and each step runs the policy alone.

Losses, on ``logp``, the summed log-probability of an answer's tokens (the prompt masked):

* DPO (Rafailov et al. 2023, sigmoid loss): ``-mean log σ(β[(π_c - ref_c) - (π_r - ref_r)])``;
  rewards ``β(π - ref)``.
* ORPO (Hong et al. 2024, as TRL computes it): the chosen answers' mean token NLL
  ``- β mean log σ(log_odds_c - log_odds_r)``, ``log_odds = m - log(1 - exp(m))`` with ``m``
  an answer's mean token log-probability; rewards ``β m``. No reference.

Written on mlx-lm's pieces rather than mlx-lm-lora, which loads a second copy of the model
as the reference and brings its own defaults and loose pins.

Determinism as in ``loop``: a pair batch's composition is fixed, the batch order of epoch
``e`` depends only on (seed, e); the reference is recomputed, identically, by a resumed run.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from voicetune.train import loop
from voicetune.train.batching import batch_order, collate, length_sorted_batches
from voicetune.train.checkpoint import Checkpoint, run_fingerprint as fingerprint_of
from voicetune.train.loop import LoopConfig, LoopResult, Objective
from voicetune.train.pairs import Pair, PreferenceError, check_counts
from voicetune.train.sft import vocabulary_head

METHODS = ("dpo", "orpo")
# Part of every preference checkpoint's fingerprint: bump it when a checkpoint's meaning changes
# (2: one file, kernels and code; see ``checkpoint.Checkpoint``).
CHECKPOINT_FORMAT = 2


# ---------------------------------------------------------------- batches
class PairBatch(NamedTuple):
    """``B`` pairs as ``2B`` padded rows: the chosen answers, then the rejected ones.
    ``target_index``/``target_weight`` as ``batching.Batch``; ``rows[r, k]`` is 1 where target
    ``k`` belongs to row ``r`` (0 for padding), so ``rows @ token_logp`` sums each answer."""

    tokens: mx.array         # (2B, width) int32
    target_index: mx.array   # (K,) int32
    target_weight: mx.array  # (K,) float32
    rows: mx.array           # (2B, K) float32


def collate_pairs(pairs: list[Pair], indices: list[int], max_seq_length: int) -> PairBatch:
    """Pad the pairs ``indices`` like ``batching.collate`` (same truncation and widths)."""
    items = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    batch = collate(items, list(range(len(items))), max_seq_length)
    width = batch.tokens.shape[1]
    index, weight = np.array(batch.target_index), np.array(batch.target_weight)
    rows = (index[None, :] // (width - 1) == np.arange(len(items))[:, None]) * weight[None, :]
    return PairBatch(batch.tokens, batch.target_index, batch.target_weight,
                     mx.array(rows.astype(np.float32)))


def pair_batches(pairs: list[Pair], batch_size: int) -> list[list[int]]:
    """Pair indices in batches of similar length (the longer answer sets a pair's width).
    Every pair is in one batch, the last possibly partial; the composition is fixed, only
    the order of the batches is shuffled from epoch to epoch."""
    return length_sorted_batches([max(len(p.chosen[0]), len(p.rejected[0])) for p in pairs], batch_size)


# ---------------------------------------------------------------- log-probabilities and losses
def sequence_logps(model, tokens: mx.array, target_index: mx.array, target_weight: mx.array,
                   rows: mx.array) -> tuple[mx.array, mx.array]:
    """(summed log-probability, number of answer tokens) of each row. Only the answer
    positions go through the vocabulary projection when the model has a plain head (see
    ``sft.masked_loss``)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    head = vocabulary_head(model)
    if head is None:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[target_index]
    else:
        hidden = model.model(inputs)
        logits = head(hidden.reshape(-1, hidden.shape[-1])[target_index])
    token_logp = -nn.losses.cross_entropy(logits, targets.reshape(-1)[target_index]).astype(mx.float32)
    return rows @ token_logp, rows.sum(axis=1)


class Outcome(NamedTuple):
    """A preference loss and what it says about the pairs it saw."""

    loss: mx.array             # scalar
    chosen_rewards: mx.array   # (B,)
    rejected_rewards: mx.array  # (B,)


def dpo_loss(beta: float, policy_chosen: mx.array, policy_rejected: mx.array,
             reference_chosen: mx.array, reference_rejected: mx.array) -> Outcome:
    """DPO's sigmoid loss (Rafailov et al. 2023) on summed log-probabilities."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return Outcome(-nn.log_sigmoid(chosen - rejected).mean(), chosen, rejected)


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 (Mächler 2012)."""
    return mx.where(x > -math.log(2), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def orpo_loss(beta: float, policy_chosen: mx.array, policy_rejected: mx.array,
              chosen_tokens: mx.array, rejected_tokens: mx.array) -> Outcome:
    """ORPO (Hong et al. 2024) as TRL computes it: the NLL of the chosen answers (mean over
    all their tokens) minus ``beta`` times the mean log-sigmoid of the log odds ratio of
    the mean token log-probabilities."""
    mean_chosen = policy_chosen / chosen_tokens
    mean_rejected = policy_rejected / rejected_tokens
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    nll = -policy_chosen.sum() / chosen_tokens.sum()
    return Outcome(nll - beta * nn.log_sigmoid(log_odds).mean(), beta * mean_chosen, beta * mean_rejected)


def preference_loss(method: str, beta: float, logps: mx.array, ntoks: mx.array,
                    reference: mx.array) -> Outcome:
    """The loss of ``B`` pairs from their ``2B`` rows (chosen first, then rejected)."""
    b = logps.shape[0] // 2
    if method == "dpo":
        return dpo_loss(beta, logps[:b], logps[b:], reference[:b], reference[b:])
    if method == "orpo":
        return orpo_loss(beta, logps[:b], logps[b:], ntoks[:b], ntoks[b:])
    raise PreferenceError(f"preference.method={method!r}: choose one of {', '.join(METHODS)}")


def reward_stats(outcome: Outcome) -> tuple[mx.array, mx.array]:
    """(reward accuracy, reward margin): the share of pairs whose chosen answer earns the
    higher reward (a tie counts as wrong), and the mean reward difference."""
    difference = outcome.chosen_rewards - outcome.rejected_rewards
    return (difference > 0).astype(mx.float32).mean(), difference.mean()


def batch_loss(model, tokens, target_index, target_weight, rows, reference, *, method: str,
               beta: float):
    """A training step's objective, as ``loop.Objective.loss``: (loss, answer tokens,
    reward accuracy, reward margin)."""
    logps, ntoks = sequence_logps(model, tokens, target_index, target_weight, rows)
    outcome = preference_loss(method, beta, logps, ntoks, reference)
    return (outcome.loss, ntoks.sum(), *reward_stats(outcome))


# ---------------------------------------------------------------- reference and validation
@contextmanager
def adapters_off(model):
    """The model with every LoRA layer's contribution scaled by 0: the reference policy."""
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def pair_logps(model, pairs: list[Pair], batches: list[list[int]], max_seq_length: int,
               progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities, answer token counts) of every pair, each ``(n, 2)``: [chosen,
    rejected], float32, computed in ``batches`` with the model in eval mode (no dropout)."""
    model.eval()
    logps = np.zeros((len(pairs), 2), np.float32)
    ntoks = np.zeros((len(pairs), 2), np.float32)
    for indices in batches:
        logp, n = sequence_logps(model, *collate_pairs(pairs, indices, max_seq_length))
        mx.eval(logp, n)
        b = len(indices)
        logps[indices] = np.array(logp).reshape(2, b).T
        ntoks[indices] = np.array(n).reshape(2, b).T
        if progress is not None:
            progress()
    return logps, ntoks


def stacked(values: np.ndarray, indices) -> mx.array:
    """Rows ``indices`` of an ``(n, 2)`` array as a batch's ``2B`` vector: chosen, then rejected."""
    part = values[list(indices)]
    return mx.array(np.concatenate([part[:, 0], part[:, 1]]))


def evaluate_pairs(method: str, beta: float, logps: np.ndarray, ntoks: np.ndarray,
                   reference: np.ndarray) -> dict:
    """The loss and reward statistics over a whole set of pairs at once (ORPO's NLL is a mean
    over all the chosen tokens, so it is not a mean of batch losses)."""
    every = range(len(logps))
    outcome = preference_loss(method, beta, stacked(logps, every), stacked(ntoks, every),
                              stacked(reference, every))
    accuracy, margin = reward_stats(outcome)
    return {"loss": outcome.loss.item(), "reward_accuracy": accuracy.item(),
            "reward_margin": margin.item(), "chosen_reward": outcome.chosen_rewards.mean().item(),
            "rejected_reward": outcome.rejected_rewards.mean().item()}


# ---------------------------------------------------------------- the run
@dataclass(frozen=True)
class PreferenceConfig(LoopConfig):
    method: str
    beta: float

    @classmethod
    def from_params(cls, preference: dict) -> "PreferenceConfig":
        # no preference.optimizer or steps_per_report: Adam, and a record every step
        return super().from_params(preference, optimizer="adam", steps_per_report=1)


# The preference.* keys that decide the run (the others belong to the pairs stage): the
# checkpoint's fingerprint and dvc.yaml's params for the stage.
RUN_KEYS = ("method", "beta", "learning_rate", "iters", "batch_size", "steps_per_eval",
            "save_every", "max_seq_length", "early_stopping", "lora", "seed")


def run_fingerprint(preference: dict, model_dir: str | Path, pairs_dir: str | Path, *,
                    fast_cpu: bool, code: str) -> str:
    """What a resumable preference run depends on (see ``checkpoint.run_fingerprint``)."""
    return fingerprint_of(["preference", CHECKPOINT_FORMAT, {k: preference.get(k) for k in RUN_KEYS}],
                          model_dir, pairs_dir, fast_cpu=fast_cpu, code=code)


@dataclass
class PreferenceResult(LoopResult):
    reference_seconds: float = 0.0


def reference_logps(model, train_pairs, valid_pairs, train_batches, valid_batches,
                    cfg: PreferenceConfig, progress: Callable[[], None] | None = None):
    """DPO's reference (the model with its adapters off): log-probabilities of the train
    pairs, and of the valid pairs with their token counts. ORPO has none: zeros."""
    if cfg.method != "dpo":
        return (np.zeros((len(train_pairs), 2), np.float32), np.zeros((len(valid_pairs), 2), np.float32),
                None)
    with adapters_off(model):
        # minutes on a CPU for a few hundred pairs: ``progress`` ticks per batch
        train_ref, _ = pair_logps(model, train_pairs, train_batches, cfg.max_seq_length, progress)
        valid_ref, valid_ntoks = pair_logps(model, valid_pairs, valid_batches, cfg.max_seq_length, progress)
    if not (np.isfinite(train_ref).all() and np.isfinite(valid_ref).all()):
        raise PreferenceError("the reference model gives non-finite log-probabilities: "
                              "check models/fused (the fuse stage) and the pairs")
    return train_ref, valid_ref, valid_ntoks


def train_preference(model, train_pairs: list[Pair], valid_pairs: list[Pair], cfg: PreferenceConfig,
                     checkpoint: Checkpoint, log: Callable[[dict], None] = lambda record: None,
                     progress_bar=None, reference_progress: Callable[[], None] | None = None
                     ) -> PreferenceResult:
    """Train the freshly adapted ``model`` (its new LoRA layers untrained: B = 0) on the
    pairs with ``loop.train``; the best adapter ends up in ``checkpoint.best_file``."""
    if cfg.method not in METHODS:
        raise PreferenceError(f"preference.method={cfg.method!r}: choose one of {', '.join(METHODS)}")
    check_counts(train_pairs, valid_pairs)
    train_batches = pair_batches(train_pairs, cfg.batch_size)
    valid_batches = pair_batches(valid_pairs, cfg.batch_size)

    # the reference, before any state is restored: the same batches as training and
    # validation, so that at step 0 policy and reference agree bit for bit
    tic = time.perf_counter()
    train_ref, valid_ref, valid_ntoks = reference_logps(model, train_pairs, valid_pairs, train_batches,
                                                        valid_batches, cfg, reference_progress)
    reference_seconds = time.perf_counter() - tic

    def batches(start: int, rank: int, size: int):
        # every process the whole batch: the preference stage runs on one process
        for number in batch_order(len(train_batches), cfg.seed, start):
            indices = train_batches[number]
            tokens = sum(min(len(p[0]), cfg.max_seq_length) for i in indices for p in train_pairs[i])
            yield (*collate_pairs(train_pairs, indices, cfg.max_seq_length), stacked(train_ref, indices)), tokens

    def validate(iteration: int) -> dict:
        # DPO's policy is the reference at step 0: its validation is the reference's numbers
        # (a loss of exactly log 2), already computed in the same batches
        logps = (valid_ref, valid_ntoks) if iteration == 0 and cfg.method == "dpo" else \
            pair_logps(model, valid_pairs, valid_batches, cfg.max_seq_length)
        stats = evaluate_pairs(cfg.method, cfg.beta, *logps, valid_ref)
        return {**{f"val_{k}": v for k, v in stats.items()},
                "val_pairs": len(valid_pairs), "val_tokens": int(logps[1].sum())}

    objective = Objective(partial(batch_loss, method=cfg.method, beta=cfg.beta), batches, validate,
                          stats=("reward_accuracy", "reward_margin"),
                          hint="Lower preference.learning_rate or check the pairs")
    result = loop.train(model, cfg, objective, checkpoint, log, progress_bar)
    return PreferenceResult(**vars(result), reference_seconds=reference_seconds)
