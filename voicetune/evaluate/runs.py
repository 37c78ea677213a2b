"""The runs side by side, with the columns people compare (`make runs`).

`dvc exp show` prints every param and every metric flattened (~150 columns), which buries
what matters. This shows, per run: the params that differ between the runs shown, the best
validation loss, LoRA vs base word overlap and ROUGE-L (mean paired difference and its 95%
CI), the LoRA's voice score and its share of the base -> author gap, the preference-tuned model
against the LoRA, the LoRA's rewrites against base's (chrF), and the library versions where
they differ.
"""
from __future__ import annotations

from voicetune.core.params import key_paths

# (column title, exp_show key, format)
METRICS = (
    # prefixed: metrics/preference.json has a best_val_loss too (exp_show then names both)
    ("best val loss", "metrics/train.json:best_val_loss", "{:.4f}"),
    ("overlap Δ", "lora_vs_base.word_overlap.mean_difference", "{:+.4f}"),
    ("overlap 95% CI", ("lora_vs_base.word_overlap.ci95_low",
                        "lora_vs_base.word_overlap.ci95_high"), "{:+.4f} … {:+.4f}"),
    ("ROUGE-L Δ", "lora_vs_base.rouge_l.mean_difference", "{:+.4f}"),
    ("ROUGE-L 95% CI", ("lora_vs_base.rouge_l.ci95_low", "lora_vs_base.rouge_l.ci95_high"),
     "{:+.4f} … {:+.4f}"),
    # the voice score: P(author) of the LoRA's answers and its share of the base -> author gap
    ("voice P(author)", "metrics/voice.json:models.lora.score", "{:.3f}"),
    ("voice gap closed (95% CI)", ("metrics/voice.json:models.lora.gap_closed.value",
                                   "metrics/voice.json:models.lora.gap_closed.ci95_low",
                                   "metrics/voice.json:models.lora.gap_closed.ci95_high"),
     "{:.0%} ({:.0%} … {:.0%})"),
    ("DPO−LoRA overlap Δ", "dpo_vs_lora.word_overlap.mean_difference", "{:+.4f}"),
    ("DPO−LoRA 95% CI", ("dpo_vs_lora.word_overlap.ci95_low",
                         "dpo_vs_lora.word_overlap.ci95_high"), "{:+.4f} … {:+.4f}"),
    # the rewrite task (data.task both or rewrite): the LoRA's rewrites against base's, chrF
    # against the held-out originals
    ("rewrite chrF Δ (95% CI)", ("lora_vs_base.rewrite.chrf.mean_difference",
                                 "lora_vs_base.rewrite.chrf.ci95_low",
                                 "lora_vs_base.rewrite.chrf.ci95_high"), "{:+.1f} ({:+.1f} … {:+.1f})"),
)
ENVIRONMENT = "metrics/train.json:environment."


def _name(row: dict) -> str:
    name = row.get("Experiment") or row.get("rev") or "?"
    return f"  └ {name}" if row.get("typ") not in ("baseline", None) else name


def _get(row: dict, key: str):
    """``row[key]``; a file-prefixed key (``file:name``) falls back to the bare name, which is
    what exp_show uses while the name belongs to one metrics file only (older runs)."""
    value = row.get(key)
    return row.get(key.partition(":")[2]) if value is None and ":" in key else value


def _cell(row: dict, key, fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    values = [_get(row, k) for k in keys]
    if any(v is None or isinstance(v, str) for v in values):
        return "-"
    return fmt.format(*values)


def _text(value) -> str:
    # dvc.api.exp_show gives the string "None" for a missing value (and for null)
    return "-" if value is None or value == "None" else str(value)


def curate(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: run name, changed params, curated metrics, differing versions."""
    params = [k for k in key_paths() if any(k in row for row in rows)]

    def differs(key):
        return len({repr(row.get(key)) for row in rows}) > 1

    changed = [k for k in params if differs(k)]
    env = sorted({k for row in rows for k in row if k.startswith(ENVIRONMENT) and differs(k)})
    headers = (["run"] + changed + [title for title, _, _ in METRICS]
               + [k.removeprefix(ENVIRONMENT) for k in env])
    table = []
    for row in rows:
        table.append([_name(row)] + [_text(row.get(k)) for k in changed]
                     + [_cell(row, key, fmt) for _, key, fmt in METRICS]
                     + [_text(row.get(k)) for k in env])
    return headers, table


def render(headers: list[str], table: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in table])
