"""Scoring rewrites: a plain draft put back into the author's voice, against the author's original.

The held-out posts' passages are the references. A rewrite is judged on both sides:

- **like the original**: chrF (sacrebleu's character n-gram F-score, the standard for
  paraphrase and style transfer) and ROUGE-L against the author's original passage;
- **the content kept**: the share of the draft's content words found in the rewrite (a rewrite
  that drops the facts is not a good rewrite), and the share of it copied verbatim from the
  draft in runs of 6+ words (a rewrite that returns the draft unchanged keeps every fact);
- **its length**: its words over the original's (``length_ratio``); ``length_off`` = |ratio - 1|
  is what comparisons use (lower is better).

The voice score of the rewrites is the voice stage's (``metrics/voice.json``, ``rewrite``).
"""
from __future__ import annotations

from voicetune.data.rewrite import draft_of
from voicetune.data.text import content_kept, copied_share, length_ratio
from voicetune.evaluate.metrics import describe, rouge_l

# per-rewrite measures: higher is better, except length_off (see compare's lower_is_better)
MEASURES = ("chrf", "rouge_l", "content_kept", "draft_copied", "length_ratio", "length_off")
LOWER_IS_BETTER = frozenset({"length_off"})
COMPARED = ("chrf", "rouge_l", "content_kept", "length_off")


def per_rewrite(rows: list[dict]) -> dict[str, list[float]]:
    """Each measure of ``MEASURES`` for every predictions row of the rewrite task (its
    ``question`` holds the instruction and the draft, its ``reference`` the original)."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    drafts = [draft_of(r["question"]) or r["question"] for r in rows]
    ratios = [length_ratio(p, ref) for p, ref in zip(preds, refs)]
    return {
        "chrf": [metric.sentence_score(p, [ref]).score for p, ref in zip(preds, refs)],
        "rouge_l": rouge_l(preds, refs),
        "content_kept": [content_kept(p, d) for p, d in zip(preds, drafts)],
        "draft_copied": [copied_share(p, d) for p, d in zip(preds, drafts)],
        "length_ratio": ratios,
        "length_off": [abs(r - 1) for r in ratios],
    }


def score(rows: list[dict]) -> tuple[dict, dict[str, list[float]]]:
    """The rewrite section of metrics/eval_<model>.json and the per-rewrite values."""
    values = per_rewrite(rows)
    summary = {name: describe(v) for name, v in values.items()}
    summary["n"] = len(rows)
    if rows and "finish_reason" in rows[0]:
        summary["hit_token_limit"] = sum(r["finish_reason"] == "length" for r in rows)
    return summary, values
