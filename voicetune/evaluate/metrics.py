"""Scoring generated answers against reference answers, and comparing two models honestly.

Word overlap is defined exactly as the seed defined it: the Jaccard index of the sets of
lower-cased ``\\w+`` words of prediction and reference (1.0 when both are empty, 0.0 when
only one is). ROUGE-L F1 comes from Google's ``rouge-score``. Comparisons are paired, per
question, with a seeded bootstrap confidence interval for the mean difference.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from voicetune.core.jsonl import read_jsonl

_WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def word_overlap(prediction: str, reference: str) -> float:
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    return len(p & r) / len(p | r)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def describe(values) -> dict:
    """mean, population std, median, min, max."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "min": float(a.min()), "max": float(a.max())}


def score(rows: list[dict], with_rouge: bool = True) -> tuple[dict, dict[str, list[float]]]:
    """Metrics of one model's predictions; also the per-question values for comparisons."""
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    per_question = {"word_overlap": [word_overlap(p, r) for p, r in zip(preds, refs)]}
    if with_rouge:
        per_question["rouge_l"] = rouge_l(preds, refs)
    summary = {name: describe(values) for name, values in per_question.items()}
    summary["prediction_chars"] = describe([len(p) for p in preds])
    summary["reference_chars"] = describe([len(r) for r in refs])
    summary["n"] = len(rows)
    if rows and "finish_reason" in rows[0]:
        summary["hit_token_limit"] = sum(r["finish_reason"] == "length" for r in rows)
    return summary, per_question


def bootstrap_ci(differences, seed: int, resamples: int = 10_000, level: float = 0.95):
    """Percentile bootstrap CI of the mean of paired differences (seeded, reproducible)."""
    d = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def compare(new: list[float], old: list[float], seed: int, tie: float = 1e-9,
            lower_is_better: bool = False) -> dict:
    """Paired comparison of per-question scores: new vs old. The difference is the
    improvement: new - old, or old - new when ``lower_is_better`` (a distance); either way
    positive means better, and ``relative_improvement`` is it over the old mean (None when
    that mean is 0)."""
    new_a, old_a = np.asarray(new), np.asarray(old)
    if new_a.shape != old_a.shape:
        raise ValueError(f"cannot pair {len(new)} scores with {len(old)}")
    diff = old_a - new_a if lower_is_better else new_a - old_a
    low, high = bootstrap_ci(diff, seed)
    return {
        "mean_new": float(new_a.mean()), "mean_old": float(old_a.mean()),
        "relative_improvement": float(diff.mean() / old_a.mean()) if old_a.mean() else None,
        "mean_difference": float(diff.mean()), "ci95_low": low, "ci95_high": high,
        "wins": int((diff > tie).sum()), "ties": int((abs(diff) <= tie).sum()),
        "losses": int((diff < -tie).sum()),
    }


def _check_prediction(row: dict) -> str | None:
    missing = [k for k in ("reference", "prediction") if not isinstance(row.get(k), str)]
    return f"missing or non-string field(s) {missing}" if missing else None


def read_predictions(path: str | Path) -> list[dict]:
    """A predictions file's rows (data/eval/<model>.jsonl); every bad line is reported,
    as file:line, in one ``JsonlError`` (a ValueError)."""
    return read_jsonl(path, _check_prediction, missing="the evaluate stage writes predictions (dvc repro evaluate)")
