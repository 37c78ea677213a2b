"""When to stop: patience counted from the last significant improvement, the lowest loss kept."""
from __future__ import annotations

import math
from dataclasses import dataclass


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
