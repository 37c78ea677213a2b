"""`make runs`: the curated comparison of runs (changed params, best validation loss, LoRA vs
base with 95% CIs, differing library versions) instead of `dvc exp show`'s ~150 columns."""
from voicetune.evaluate.runs import curate, render

from tests.conftest import ROOT


def row(rev, rank, loss, low, env="0.32.4", typ="baseline"):
    return {"rev": rev, "Experiment": None, "typ": typ, "lora.rank": rank, "data.seed": 42,
            "best_val_loss": loss, "tokens_per_second": 100.0 + rank,
            "lora_vs_base.word_overlap.mean_difference": 0.02,
            "lora_vs_base.word_overlap.ci95_low": low, "lora_vs_base.word_overlap.ci95_high": 0.03,
            "lora_vs_base.rouge_l.mean_difference": 0.03,
            "lora_vs_base.rouge_l.ci95_low": 0.02, "lora_vs_base.rouge_l.ci95_high": 0.04,
            # metrics/voice.json's names are its own: exp_show leaves them unprefixed
            "models.lora.score": 0.555, "models.lora.gap_closed.value": 0.529,
            "models.lora.gap_closed.ci95_low": 0.441, "models.lora.gap_closed.ci95_high": 0.612,
            "dpo_vs_lora.word_overlap.mean_difference": -0.006,
            "dpo_vs_lora.word_overlap.ci95_low": -0.018, "dpo_vs_lora.word_overlap.ci95_high": 0.005,
            "lora_vs_base.rewrite.chrf.mean_difference": 11.78, "lora_vs_base.rewrite.chrf.ci95_low": 2.09,
            "lora_vs_base.rewrite.chrf.ci95_high": 19.43,
            "metrics/train.json:environment.mlx": env,
            "metrics/train.json:environment.python": "3.11.7"}


def test_only_changed_params_the_curated_metrics_and_differing_versions():
    main = row("main", 16, 3.5349, -0.001)
    # with metrics/preference.json beside it, exp_show names train.json's loss by its file
    main["metrics/train.json:best_val_loss"] = main.pop("best_val_loss")
    rows = [row("workspace", 8, 3.51, 0.007, env="0.33.0"), main,
            {**row("exp-1", 4, 3.6, 0.01), "typ": "branch_commit", "Experiment": "exp-1"}]
    headers, table = curate(rows)
    assert headers == ["run", "lora.rank", "best val loss", "overlap Δ", "overlap 95% CI",
                       "ROUGE-L Δ", "ROUGE-L 95% CI", "voice P(author)", "voice gap closed (95% CI)",
                       "DPO−LoRA overlap Δ", "DPO−LoRA 95% CI", "rewrite chrF Δ (95% CI)",
                       "mlx"]  # not data.seed, python, tokens/s
    assert table[1] == ["main", "16", "3.5349", "+0.0200", "-0.0010 … +0.0300", "+0.0300",
                        "+0.0200 … +0.0400", "0.555", "53% (44% … 61%)", "-0.0060", "-0.0180 … +0.0050",
                        "+11.8 (+2.1 … +19.4)", "0.32.4"]
    assert table[2][0].endswith("exp-1") and table[0][-1] == "0.33.0"
    text = render(headers, table)
    assert text.splitlines()[0].startswith("run") and "-0.0010 … +0.0300" in text


def test_a_run_without_evaluation_shows_dashes():
    headers, table = curate([row("a", 8, 3.5, 0.0), {"rev": "b", "typ": "baseline", "lora.rank": 4}])
    start = headers.index("best val loss")
    assert table[1][start:start + 7] == ["-"] * 7 and table[0][start] == "3.5000"


def test_the_columns_exist_in_this_projects_real_runs():
    import dvc.api

    headers, table = curate(dvc.api.exp_show(repo=str(ROOT), num=1))
    start = headers.index("best val loss")
    assert all(cell != "-" for cell in table[-1][start:start + 7]), (headers, table)
