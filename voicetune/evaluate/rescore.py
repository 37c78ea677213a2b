"""Scoring prediction files side by side (``python -m voicetune.tools.score``): naming each
file by as much of its path as tells it apart, refusing to pair files of different questions,
and the table of their scores."""
from __future__ import annotations

from pathlib import Path


class PairingError(ValueError):
    pass


def run_names(paths: list[Path]) -> list[str]:
    """The shortest path tails that tell the files apart: ``lora`` for data/eval/lora.jsonl,
    ``a/lora`` and ``b/lora`` for a/lora.jsonl and b/lora.jsonl (and ``_predictions`` cut)."""
    parts = [[*p.parts[:-1], p.stem.removesuffix("_predictions")] for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{i + 1}" for i, name in enumerate(names)]  # one file given twice


def check_same_questions(path: Path, rows: list[dict], first_path: Path, first: list[dict]) -> None:
    """Refuse to pair ``rows`` with ``first`` unless they answer the same questions in order."""
    if len(rows) != len(first):
        raise PairingError(f"{path} has {len(rows)} answers, {first_path} has {len(first)}: "
                           "score files of the same questions")
    for i, (row, ref) in enumerate(zip(rows, first)):
        key = "question" if "question" in row or "question" in ref else "prompt"
        if row.get(key) != ref.get(key):
            raise PairingError(f"{path}:{i + 1}: {key} {row.get(key)!r} differs from {first_path}:{i + 1} "
                               f"({ref.get(key)!r}): the files must hold the same questions in the "
                               "same order")


def table(results: dict[str, dict]) -> str:
    lines = ["| run | mean overlap | std | min | max | ROUGE-L | prediction chars | reference chars |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        o, p, r = s["word_overlap"], s["prediction_chars"], s["reference_chars"]
        rouge = f"{s['rouge_l']['mean']:.4f}" if "rouge_l" in s else "-"
        lines.append(f"| {name} | {o['mean']:.4f} | {o['std']:.4f} | {o['min']:.4f} | {o['max']:.4f} "
                     f"| {rouge} | {p['mean']:.1f} ± {p['std']:.1f} | {r['mean']:.1f} ± {r['std']:.1f} |")
    return "\n".join(lines)
