"""Scoring: the seed's word overlap exactly, ROUGE-L, paired bootstrap comparisons."""
import json

import numpy as np
import pytest

from voicetune.tools import score as score_cli
from voicetune.evaluate.metrics import bootstrap_ci, compare, describe, score, word_overlap

from tests.conftest import SHARED, shared_file

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


def test_bootstrap_of_a_constant_difference_has_no_width():
    assert bootstrap_ci([0.25] * 30, seed=0) == (0.25, 0.25)
    low, high = bootstrap_ci([0.1] * 7, seed=3)
    assert low == pytest.approx(0.1, abs=1e-12) and high == pytest.approx(0.1, abs=1e-12)


def test_bootstrap_of_two_values_by_hand():
    # resampling [0, 1] gives means 0, 1/2, 1 with chances 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1
    assert bootstrap_ci([0.0, 1.0], seed=0) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], seed=0, level=0.4) == (0.5, 0.5)


def test_bootstrap_matches_the_normal_interval():
    # textbook: for n = 400 the percentile bootstrap CI of a mean is mean ± 1.96·sd/√n
    d = np.random.default_rng(11).normal(0.05, 0.2, 400)
    half = 1.96 * d.std() / np.sqrt(len(d))
    low, high = bootstrap_ci(d, seed=0)
    assert low == pytest.approx(d.mean() - half, abs=0.05 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.05 * half)


def test_bootstrap_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(5)
    covered = 0
    for trial in range(200):
        low, high = bootstrap_ci(rng.normal(0.3, 1.0, 60), seed=trial, resamples=2000)
        covered += low <= 0.3 <= high
    assert 0.90 <= covered / 200 <= 0.99


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


def test_scorer_reproduces_the_published_reference_figures(capsys):
    shared_file(str(REFERENCE.relative_to(SHARED)))
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


def write_predictions(path, questions, predictions, key="question"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: q, "reference": "reef early and often", "prediction": p}) + "\n"
                            for q, p in zip(questions, predictions)))
    return path


def test_scorer_survives_a_zero_mean(tmp_path, capsys):
    base = write_predictions(tmp_path / "base.jsonl", ["q1", "q2"], ["xyz", "abc"])  # overlap 0
    lora = write_predictions(tmp_path / "lora.jsonl", ["q1", "q2"], ["reef early", "often"])
    assert score_cli.main([str(base), str(lora), "--no-rouge"]) == 0
    out = capsys.readouterr().out
    assert "lora_vs_base (word overlap): relative change n/a (base mean is 0), mean difference +0.3750" in out


def test_scorer_refuses_files_with_other_questions(tmp_path, capsys):
    base = write_predictions(tmp_path / "base.jsonl", ["q1", "q2", "q3"], ["a", "b", "c"])
    lora = write_predictions(tmp_path / "lora.jsonl", ["q1", "q3", "q2"], ["a", "b", "c"])
    assert score_cli.main([str(base), str(lora), "--no-rouge"]) == 2
    err = capsys.readouterr().err
    assert f"score: {lora}:2: question 'q3' differs from {base}:2 ('q2')" in err
    # without a question field, the prompts are compared
    base = write_predictions(tmp_path / "p/base.jsonl", ["p1", "p2"], ["a", "b"], key="prompt")
    short = write_predictions(tmp_path / "p/lora.jsonl", ["p1"], ["a"], key="prompt")
    other = write_predictions(tmp_path / "p/fused.jsonl", ["p1", "P2"], ["a", "b"], key="prompt")
    assert score_cli.main([str(base), str(other), "--no-rouge"]) == 2
    assert f"{other}:2: prompt 'P2' differs from {base}:2 ('p2')" in capsys.readouterr().err
    assert score_cli.main([str(base), str(short), "--no-rouge"]) == 2
    assert f"{short} has 1 answers, {base} has 2" in capsys.readouterr().err


def test_scorer_names_files_with_the_same_stem_apart(tmp_path, capsys):
    base = write_predictions(tmp_path / "run1/lora.jsonl", ["q1", "q2"], ["reef", "early"])
    other = write_predictions(tmp_path / "run2/lora.jsonl", ["q1", "q2"], ["reef early", "often"])
    assert score_cli.main([str(base), str(other), "--no-rouge", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["runs"]) == ["run1/lora", "run2/lora"]
    assert list(out["word_overlap_comparisons"]) == ["run2/lora_vs_run1/lora"]
    assert out["runs"]["run1/lora"]["word_overlap"]["mean"] != out["runs"]["run2/lora"]["word_overlap"]["mean"]
