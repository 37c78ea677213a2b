"""Padded batches, grouped by length and shuffled per epoch: the order every objective
trains in. Every sample counts: an epoch trains on every sample once (its last batch may
be partial). The batch order of epoch ``e`` depends only on (seed, e)."""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import mlx.core as mx
import numpy as np

PAD_MULTIPLE = 32  # as mlx-lm: pad each batch to a multiple of 32 tokens (+1 for the shift)


class Batch(NamedTuple):
    """A padded batch. ``target_index`` lists the flattened (row * (width - 1) + position)
    indices of the trained targets, padded to a multiple of PAD_MULTIPLE with weight 0."""

    tokens: mx.array          # (B, width) token ids, zero-padded
    lengths: mx.array         # (B, 2): [prompt offset, length] as mlx-lm's loss expects
    target_index: mx.array    # (K,) int32
    target_weight: mx.array   # (K,) float32, 1 for real targets, 0 for padding


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding). Every index is in one
    batch: the last, partial one holds the longest samples, so dropping it would bias
    validation towards short answers."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def batch_order(n_batches: int, seed: int, start: int = 0) -> Iterator[int]:
    """Endless batch numbers, shuffled per epoch, beginning after ``start`` consumed."""
    step = start
    while True:
        epoch, pos = divmod(step, n_batches)
        yield int(epoch_order(n_batches, seed, epoch)[pos])
        step += 1


def empty_batch() -> Batch:
    """A batch that trains nothing: one row of padding, every target weight 0. A process
    gets it when a partial batch has fewer rows than there are processes, so that it still
    joins the step's collective operations, with zero loss, tokens and gradients."""
    return Batch(mx.zeros((1, PAD_MULTIPLE + 1), mx.int32), mx.array([[0, 0]], mx.int32),
                 mx.zeros((PAD_MULTIPLE,), mx.int32), mx.zeros((PAD_MULTIPLE,), mx.float32))


def collate(dataset, indices: list[int], max_seq_length: int) -> Batch:
    """Pad a batch of ``(tokens, answer offset)`` items to a multiple of PAD_MULTIPLE (+1
    for the shift) and index its targets."""
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
