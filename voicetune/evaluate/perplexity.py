"""How likely a model finds the author's own answers: the perplexity of the test split's
reference answers, teacher-forced, over the assistant tokens only (the prompt is masked)."""
from __future__ import annotations

import math

from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

from voicetune.train.sft import validation_loss


def reference_scores(model, tokenizer, rows: list[dict], max_seq_length: int = 4096) -> dict:
    """``reference_loss`` (mean cross-entropy per answer token of the rows' conversations, one
    conversation a batch, as training's validation loss) and ``reference_perplexity``."""
    test_set = CacheDataset(ChatDataset([{"messages": r["messages"]} for r in rows], tokenizer,
                                        mask_prompt=True))
    loss = validation_loss(model, test_set, batch_size=1, max_seq_length=max_seq_length)
    return {"reference_loss": loss, "reference_perplexity": math.exp(loss)}
