"""Scoring: the seed's word overlap exactly, ROUGE-L, paired bootstrap comparisons."""
import json

import pytest

from voicetune import score as score_cli
from voicetune.metrics import bootstrap_ci, compare, describe, score, word_overlap

from .conftest import SHARED

REFERENCE = SHARED / "reference/blog-eval"


def test_word_overlap_definition():
    assert word_overlap("", "") == 1.0
    assert word_overlap("", "words") == 0.0 and word_overlap("words", "") == 0.0
    assert word_overlap("!!!", "...") == 1.0  # no \w+ words on either side
    assert word_overlap("The cat, the CAT!", "the cat sat") == pytest.approx(2 / 3)
    assert word_overlap("reef early", "Reef early.") == 1.0


def test_describe_uses_population_std():
    assert describe([1, 2, 3, 4]) == {"mean": 2.5, "std": pytest.approx(1.118034), "median": 2.5,
                                      "min": 1.0, "max": 4.0}


def test_bootstrap_is_seeded_and_brackets_the_mean():
    diffs = [0.1, -0.05, 0.2, 0.0, 0.15, 0.05, -0.1, 0.3]
    low, high = bootstrap_ci(diffs, seed=1)
    assert (low, high) == bootstrap_ci(diffs, seed=1) != bootstrap_ci(diffs, seed=2)
    assert low < sum(diffs) / len(diffs) < high


def test_compare_counts_wins_ties_losses():
    c = compare([0.5, 0.2, 0.3, 0.9], [0.4, 0.2, 0.6, 0.1], seed=0)
    assert (c["wins"], c["ties"], c["losses"]) == (2, 1, 1)
    assert c["mean_difference"] == pytest.approx(0.15)
    assert c["relative_improvement"] == pytest.approx(0.15 / 0.325)
    with pytest.raises(ValueError, match="cannot pair"):
        compare([1.0], [1.0, 2.0], seed=0)


def test_score_counts_answers_that_hit_the_limit():
    rows = [{"reference": "a b", "prediction": "a b", "finish_reason": "stop"},
            {"reference": "a b", "prediction": "c", "finish_reason": "length"}]
    summary, per_q = score(rows)
    assert per_q["word_overlap"] == [1.0, 0.0] and summary["hit_token_limit"] == 1
    assert summary["rouge_l"]["max"] == 1.0 and summary["n"] == 2


@pytest.mark.skipif(not REFERENCE.exists(), reason="needs ../shared (developer machines and CI)")
def test_scorer_reproduces_the_published_reference_figures(capsys):
    assert score_cli.main([str(REFERENCE / "base_predictions.jsonl"),
                           str(REFERENCE / "lora_predictions.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = {  # ../shared/README.md
        "base": (0.1563, 0.0468, 0.0000, 0.3333, 866.8, 154.2),
        "lora": (0.1940, 0.0627, 0.0658, 0.3846, 377.1, 70.4),
    }
    for run, (mean, std, low, high, chars, chars_std) in expected.items():
        o, p = out["runs"][run]["word_overlap"], out["runs"][run]["prediction_chars"]
        assert [round(o[k], 4) for k in ("mean", "std", "min", "max")] == [mean, std, low, high]
        assert (round(p["mean"], 1), round(p["std"], 1)) == (chars, chars_std)
        r = out["runs"][run]["reference_chars"]
        assert (round(r["mean"], 1), round(r["std"], 1)) == (405.8, 186.8)
    assert round(100 * out["word_overlap_comparisons"]["lora_vs_base"]["relative_improvement"], 1) == 24.2


def test_scorer_reports_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n")
    assert score_cli.main([str(bad)]) == 2
    assert "bad.jsonl:1: missing or non-string field(s) ['prediction']" in capsys.readouterr().err
