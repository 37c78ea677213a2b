"""Preference tuning (DPO, ORPO) of new LoRA adapters on the fused SFT model, with the
guarantees of ``training``: validation with real early stopping, the best adapter kept,
checkpoints and exact resume, non-finite losses caught.

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

Determinism as in ``training``: a pair batch's composition is fixed, the batch order of epoch
``e`` depends only on (seed, e), step ``i``'s dropout on (seed, i), and a checkpoint holds
the adapter, the optimizer state, the iteration and the early-stopping state; the reference
is recomputed, identically, by a resumed run.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.datasets import ChatDataset

from voicetune.core.errors import UserError
from voicetune.train.sft import (Checkpoint, EarlyStopping, Progress, _restore_state, _state_tensors,
                       adapter_weights, collate, epoch_order, fingerprint, make_optimizer,
                       model_files, step_seed, vocabulary_head)

METHODS = ("dpo", "orpo")
# Part of every preference checkpoint's fingerprint: bump it when a checkpoint's meaning changes
# (2: one file, kernels and code; see ``training.Checkpoint``).
CHECKPOINT_FORMAT = 2


class PreferenceError(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------- pairs
class Pair(NamedTuple):
    """One preference pair as token sequences, each ``(tokens, answer offset)`` as mlx-lm's
    ChatDataset gives them with ``mask_prompt``."""

    chosen: tuple[list[int], int]
    rejected: tuple[list[int], int]


def read_pairs(path: str | Path) -> list[dict]:
    """The pairs of a JSONL file, each ``{"prompt", "chosen", "rejected"}`` and optionally
    ``"system"`` (other keys are ignored); every bad line is named as ``file:line``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PreferenceError(f"{path}: no such file (the pairs stage writes it)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PreferenceError(f"{path}: cannot be read: {err}") from None
    rows, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: invalid JSON: {err}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number}: expected an object with prompt, chosen, rejected")
            continue
        bad = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row.get(key), str)]
        if "prompt" not in bad and not row["prompt"].strip():
            bad.insert(0, "prompt")
        if row.get("system") is not None and not isinstance(row["system"], str):
            bad.append("system")
        if bad:
            problems.append(f"{path}:{number}: {', '.join(bad)}: expected strings (a non-empty "
                            "prompt, the chosen and rejected answers, optionally a system prompt)")
            continue
        rows.append(row)
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise PreferenceError("\n".join([f"{len(problems)} bad pairs:", *shown])
                              if len(problems) > 1 else problems[0])
    return rows


def check_counts(train: list, valid: list) -> None:
    """Both splits must hold pairs: training needs something to learn from, early stopping
    something to validate on."""
    for name, pairs in (("training", train), ("validation", valid)):
        if not pairs:
            raise PreferenceError(f"no {name} pairs: the pairs stage wrote none (see "
                                  "preference.pairs, preference.valid_ratio, preference.sources)")


def pair_messages(row: dict, answer: str) -> list[dict]:
    """The chat of a pair with one of its answers: [system,] user, assistant."""
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": answer}]


def tokenize_pairs(rows: list[dict], tokenizer, max_seq_length: int, where: str = "pairs") -> list[Pair]:
    """Both answers of each pair, chat-templated with the prompt masked. A pair that keeps no
    answer token within ``max_seq_length`` is refused: it would train nothing, and ORPO's
    mean log-probability would be 0/0."""
    dataset = ChatDataset([], tokenizer, mask_prompt=True)
    pairs, too_long = [], []
    for i, row in enumerate(rows):
        pair = Pair(*(dataset.process({"messages": pair_messages(row, row[key])})
                      for key in ("chosen", "rejected")))
        if any(min(len(tokens), max_seq_length) <= offset for tokens, offset in pair):
            too_long.append(f"pair {i + 1} (prompt: {pair.chosen[1]} tokens)")
        pairs.append(pair)
    if too_long:
        raise PreferenceError(
            f"{where}: {len(too_long)} pairs keep no answer token within preference.max_seq_length="
            f"{max_seq_length}: {', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}; "
            "raise preference.max_seq_length")
    return pairs


# ---------------------------------------------------------------- batches
class PairBatch(NamedTuple):
    """``B`` pairs as ``2B`` padded rows: the chosen answers, then the rejected ones.
    ``target_index``/``target_weight`` as ``training.Batch``; ``rows[r, k]`` is 1 where target
    ``k`` belongs to row ``r`` (0 for padding), so ``rows @ token_logp`` sums each answer."""

    tokens: mx.array         # (2B, width) int32
    target_index: mx.array   # (K,) int32
    target_weight: mx.array  # (K,) float32
    rows: mx.array           # (2B, K) float32


def collate_pairs(pairs: list[Pair], indices: list[int], max_seq_length: int) -> PairBatch:
    """Pad the pairs ``indices`` like ``training.collate`` (same truncation and widths)."""
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
    lengths = [max(len(p.chosen[0]), len(p.rejected[0])) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_order(n_batches: int, seed: int, start: int = 0) -> Iterator[int]:
    """Endless batch numbers, shuffled per epoch, beginning after ``start`` consumed."""
    step = start
    while True:
        epoch, pos = divmod(step, n_batches)
        yield int(epoch_order(n_batches, seed, epoch)[pos])
        step += 1


# ---------------------------------------------------------------- log-probabilities and losses
def sequence_logps(model, tokens: mx.array, target_index: mx.array, target_weight: mx.array,
                   rows: mx.array) -> tuple[mx.array, mx.array]:
    """(summed log-probability, number of answer tokens) of each row. Only the answer
    positions go through the vocabulary projection when the model has a plain head (see
    ``training.masked_loss``)."""
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
    """A training step's objective: (loss, reward accuracy, reward margin, answer tokens)."""
    logps, ntoks = sequence_logps(model, tokens, target_index, target_weight, rows)
    outcome = preference_loss(method, beta, logps, ntoks, reference)
    return (outcome.loss, *reward_stats(outcome), ntoks.sum())


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


# ---------------------------------------------------------------- config and checkpoints
@dataclass
class PreferenceConfig:
    method: str
    beta: float
    learning_rate: float
    iters: int
    batch_size: int
    steps_per_eval: int
    save_every: int
    max_seq_length: int = 2048
    seed: int = 0
    patience: int = 5
    min_delta: float = 0.001

    @classmethod
    def from_params(cls, preference: dict) -> "PreferenceConfig":
        stopping = preference.get("early_stopping", {})
        keys = [f for f in cls.__dataclass_fields__ if f in preference]
        return cls(**{k: preference[k] for k in keys}, patience=stopping.get("patience", 5),
                   min_delta=stopping.get("min_delta", 0.001))


# The preference.* keys that decide the run (the others belong to the pairs stage): the
# checkpoint's fingerprint and dvc.yaml's params for the stage.
RUN_KEYS = ("method", "beta", "learning_rate", "iters", "batch_size", "steps_per_eval",
            "save_every", "max_seq_length", "early_stopping", "lora", "seed")


def run_fingerprint(preference: dict, model_dir: str | Path, pairs_dir: str | Path, *,
                    fast_cpu: bool, code: str) -> str:
    """What a resumable preference run depends on: its params, every file of the model by
    content, the pairs, and what computes each step (the fast CPU kernels on or off, the
    code: see ``training.run_fingerprint``)."""
    root, data = Path(model_dir), Path(pairs_dir)
    return fingerprint("preference", CHECKPOINT_FORMAT, {k: preference.get(k) for k in RUN_KEYS},
                       {"fast_cpu": bool(fast_cpu), "code": code},
                       *[x for p in model_files(root) for x in (p.relative_to(root).as_posix(), p)],
                       data / "train.jsonl", data / "valid.jsonl")


# ---------------------------------------------------------------- the loop
def make_step(model, optimizer, method: str, beta: float):
    """A compiled step ``step(*batch, reference) -> (loss, accuracy, margin, ntoks)`` and the
    state to evaluate after it (as ``training.make_step``, with the preference loss)."""
    loss_and_grad = nn.value_and_grad(model, partial(batch_loss, method=method, beta=beta))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (loss, accuracy, margin, ntoks), grads = loss_and_grad(model, *batch)
        optimizer.update(model, grads)
        return loss, accuracy, margin, ntoks

    return step, state


@dataclass
class PreferenceResult:
    base: dict            # the step-0 validation (the SFT model itself)
    best: dict            # the validation of the adapter kept
    best_iteration: int
    stopped_at: int
    stop_reason: str      # "early_stop" | "iters_done" (a non-finite loss raises PreferenceError)
    resumed_from: int
    history: list
    train_seconds: float
    reference_seconds: float
    validation_seconds: float
    peak_memory_gb: float
    tokens_per_second: float


def train_preference(model, train_pairs: list[Pair], valid_pairs: list[Pair], cfg: PreferenceConfig,
                     checkpoint: Checkpoint, log: Callable[[dict], None] = lambda record: None,
                     progress_bar=None, reference_progress: Callable[[], None] | None = None
                     ) -> PreferenceResult:
    """Train the freshly adapted ``model`` (its new LoRA layers untrained: B = 0) on the
    pairs; the best adapter ends up in ``checkpoint.best_file``. ``log`` receives every
    record (train and validation), replayed from the checkpoint on resume."""
    if cfg.method not in METHODS:
        raise PreferenceError(f"preference.method={cfg.method!r}: choose one of {', '.join(METHODS)}")
    check_counts(train_pairs, valid_pairs)
    train_batches = pair_batches(train_pairs, cfg.batch_size)
    valid_batches = pair_batches(valid_pairs, cfg.batch_size)

    # the reference, before any state is restored: the same batches as training and
    # validation, so that at step 0 policy and reference agree bit for bit
    tic = time.perf_counter()
    if cfg.method == "dpo":
        with adapters_off(model):
            # minutes on a CPU for a few hundred pairs: ``reference_progress`` ticks per batch
            train_ref, _ = pair_logps(model, train_pairs, train_batches, cfg.max_seq_length,
                                      reference_progress)
            valid_ref, valid_ntoks = pair_logps(model, valid_pairs, valid_batches, cfg.max_seq_length,
                                                reference_progress)
        if not (np.isfinite(train_ref).all() and np.isfinite(valid_ref).all()):
            raise PreferenceError("the reference model gives non-finite log-probabilities: "
                                  "check models/fused (the fuse stage) and the pairs")
    else:  # ORPO has no reference
        train_ref = np.zeros((len(train_pairs), 2), np.float32)
        valid_ref, valid_ntoks = np.zeros((len(valid_pairs), 2), np.float32), None
    reference_seconds = time.perf_counter() - tic

    optimizer = make_optimizer("adam", cfg.learning_rate)
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
    step, state = make_step(model, optimizer, cfg.method, cfg.beta)
    timing = {"validation": 0.0}

    def record(entry: dict) -> None:
        progress.history.append(entry)
        log(entry)

    def validate(iteration: int, logps: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        tic = time.perf_counter()
        if logps is None:
            logps = pair_logps(model, valid_pairs, valid_batches, cfg.max_seq_length)
        model.train()
        stats = evaluate_pairs(cfg.method, cfg.beta, *logps, valid_ref)
        timing["validation"] += time.perf_counter() - tic
        finite = math.isfinite(stats["loss"])
        # the best adapter is saved before ``log`` sees the record: what is kept is the
        # adapter that was validated, whatever an observer of the record does
        if finite and stopping.update(stats["loss"], iteration):
            checkpoint.save_best(adapter_weights(model))
        record({"step": iteration, **{f"val_{k}": v for k, v in stats.items()},
                "val_pairs": len(valid_pairs), "val_tokens": int(logps[1].sum())})
        if not finite:
            raise PreferenceError(f"validation loss is {stats['loss']} at iteration {iteration}")

    model.train()
    if progress.iteration == 0:
        # DPO's policy is the reference at step 0: its validation is the reference's numbers
        # (a loss of exactly log 2), already computed in the same batches
        validate(0, (valid_ref, valid_ntoks) if cfg.method == "dpo" else None)

    order = train_order(len(train_batches), cfg.seed, start=progress.iteration)
    stop_reason, iteration = "iters_done", progress.iteration
    if progress_bar is not None:
        progress_bar.update(progress.iteration)
    for iteration in range(progress.iteration + 1, cfg.iters + 1):
        indices = train_batches[next(order)]
        batch = collate_pairs(train_pairs, indices, cfg.max_seq_length)
        # step i's random stream (LoRA dropout) depends on (seed, i) alone
        mx.random.seed(step_seed(cfg.seed, iteration))
        tic = time.perf_counter()
        loss, accuracy, margin, ntoks = step(*batch, stacked(train_ref, indices))
        mx.eval(state, loss, accuracy, margin, ntoks)
        elapsed = time.perf_counter() - tic
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise PreferenceError(
                f"training loss is {loss_value} at iteration {iteration}; the best adapter so "
                f"far (iteration {stopping.best_iter}, val loss {stopping.best_loss:.4f}) is "
                f"kept in {checkpoint.best_file}. Lower preference.learning_rate or check the pairs")
        progress.train_seconds += elapsed
        tokens = sum(min(len(p[0]), cfg.max_seq_length) for i in indices for p in train_pairs[i])
        record({"step": iteration, "train_loss": loss_value,
                "train_reward_accuracy": accuracy.item(), "train_reward_margin": margin.item(),
                "learning_rate": optimizer.learning_rate.item(),
                "tokens_per_second": tokens / elapsed, "seconds_per_iteration": elapsed,
                "peak_memory_gb": mx.get_peak_memory() / 1e9})
        if progress_bar is not None:
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{loss_value:.3f}", best_val=f"{stopping.best_loss:.3f}")

        if iteration % cfg.steps_per_eval == 0 or iteration == cfg.iters:
            validate(iteration)
        progress.iteration = iteration
        progress.stopping = asdict(stopping)
        if stopping.should_stop:
            stop_reason = "early_stop"
            break
        if iteration % cfg.save_every == 0 and iteration < cfg.iters:
            checkpoint.save(progress, _state_tensors(model, optimizer))

    validations = {r["step"]: r for r in progress.history if "val_loss" in r}
    train_records = [r for r in progress.history if "tokens_per_second" in r]
    return PreferenceResult(
        base=validations[0], best=validations[stopping.best_iter], best_iteration=stopping.best_iter,
        stopped_at=iteration, stop_reason=stop_reason, resumed_from=resumed_from,
        history=progress.history, train_seconds=progress.train_seconds,
        reference_seconds=reference_seconds, validation_seconds=timing["validation"],
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        tokens_per_second=float(np.median([r["tokens_per_second"] for r in train_records]))
        if train_records else 0.0)
