"""Style control (voicetune/evaluate/style_control.py) on constructed battles whose truth is
known: length alone deciding the votes, one model truly better at equal lengths, a better model
hidden by being shorter; and the fit's agreement with the arena's plain Bradley–Terry."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from voicetune.evaluate import ratings, style_control
from voicetune.evaluate.style_control import fit, style_features

MODELS = ("base", "lora", "fused")
LOG3 = 400 * math.log10(3)


def sampled(n: int, typical: dict[str, float], quality: dict[str, float], beta: float,
            seed: int = 0, spread: float = 0.35) -> list[dict]:
    """``n`` battles drawn from the model itself: each answer's length is lognormal around its
    model's typical length, and a beats b with P = sigmoid(q_a - q_b + beta * f_length)."""
    rng = np.random.default_rng(seed)
    names = list(typical)
    battles = []
    for _ in range(n):
        a, b = rng.choice(names, 2, replace=False)
        len_a, len_b = (int(rng.lognormal(math.log(typical[m]), spread)) + 1 for m in (a, b))
        f = (len_a - len_b) / (len_a + len_b)
        p = 1 / (1 + math.exp(-(quality[a] - quality[b] + beta * f)))
        battles.append({"a": str(a), "b": str(b), "winner": "a" if rng.random() < p else "b",
                        "text_a": "x" * len_a, "text_b": "x" * len_b})
    return battles


def covers(m: dict, key: str, value: float) -> bool:
    return m[f"{key}_ci_low"] <= value <= m[f"{key}_ci_high"]


# ------------------------------------------------------------------ the features
def test_style_features_count_markdown_not_look_alikes():
    text = ("# Title\n#hashtag is no header\n## Part two\n- one\n* two\n+ three\n1. four\n"
            "2) five\n**bold at the start** is no list item, nor is -dash\n__also bold__ and "
            "** spaced ** is not bold")
    f = style_features(text)
    assert (f["headers"], f["list_items"], f["bold"]) == (2, 5, 2)
    assert f["length"] == len(text)
    assert style_features("") == {"length": 0, "headers": 0, "list_items": 0, "bold": 0}


def test_style_differences_are_normalized_and_zero_when_both_lack_a_feature():
    f = style_control.style_differences("x" * 30, "x" * 10)
    assert f.tolist() == [0.5, 0.0, 0.0, 0.0]  # (30 - 10) / (30 + 10); no markdown on either
    assert style_control.style_differences("- a\n- b", "plain").tolist()[2] == 1.0


# ------------------------------------------------------------------ length alone explains the votes
def test_when_the_longer_answer_always_wins_the_controlled_ratings_lose_their_gaps():
    # three models of equal quality, typically 200, 400 and 800 characters, with overlapping
    # lengths (so each sometimes is the longer one); the longer answer wins every battle
    battles = sampled(600, {"base": 200, "lora": 400, "fused": 800}, dict.fromkeys(MODELS, 0), 0)
    for b in battles:
        b["winner"] = "a" if len(b["text_a"]) > len(b["text_b"]) else "b"
    result = fit(battles, rounds=300)
    m = result["models"]
    assert m["lora"]["rating_ci_low"] > 1300 and m["fused"]["rating_ci_low"] > 1700
    assert not result["separated"]  # every model lost sometimes: the raw fit is finite
    # length decides every vote, so nothing is left for the models: their controlled ratings
    # are not identified (a weak prior holds them), and their intervals all cover "no gap"
    assert result["controlled_separated"]
    for name in ("lora", "fused"):
        assert covers(m[name], "controlled_rating", 1000), name
        assert abs(m[name]["controlled_rating"] - 1000) < (m[name]["rating"] - 1000) / 2, name
    assert result["coefficients"]["length"]["ci_low"] > 50  # huge: the prior alone bounds it
    assert result["coefficients"]["headers"] is None  # no markdown anywhere: nothing to fit
    json.dumps(result, allow_nan=False)


def test_a_known_length_effect_is_recovered_and_taken_out():
    # equal quality, P(a wins) = sigmoid(3 f_length): the fit must find beta = 3 and no gap
    battles = sampled(1500, {"base": 200, "lora": 400, "fused": 800}, dict.fromkeys(MODELS, 0), 3.0)
    result = fit(battles, rounds=300)
    length = result["coefficients"]["length"]
    assert length["ci_low"] < 3.0 < length["ci_high"] and length["ci_low"] > 1.5
    m = result["models"]
    for name in ("lora", "fused"):
        assert abs(m[name]["controlled_rating"] - 1000) < 40, m[name]
    assert m["fused"]["rating_ci_low"] > 1100  # raw: the longest model looks far better
    for name in ("lora", "fused"):
        assert covers(m[name], "controlled_rating", 1000), name
        assert covers(m[name], "controlled_win_prob", 0.5), name
    assert not result["controlled_separated"]


# ------------------------------------------------------------------ a real difference survives
def test_a_truly_better_model_keeps_its_lead_at_balanced_lengths():
    # lora wins 3:1 on quality (theta gap ln 3); lengths drawn alike and no length effect
    battles = sampled(1200, {"base": 300, "lora": 300}, {"base": 0.0, "lora": math.log(3)}, 0.0)
    result = fit(battles, rounds=300)
    lora = result["models"]["lora"]
    assert lora["controlled_rating_ci_low"] > 1100
    assert covers(lora, "controlled_rating", 1000 + LOG3) and covers(lora, "rating", 1000 + LOG3)
    assert abs(lora["controlled_rating"] - lora["rating"]) < 15
    assert covers(lora, "controlled_win_prob", 0.75)
    length = result["coefficients"]["length"]
    assert length["ci_low"] < 0 < length["ci_high"]  # no length effect found where there is none


def test_a_better_but_shorter_model_is_undersold_raw_and_restored_controlled():
    # lora is better by ln 3 but writes a third as much; readers like length (beta 3)
    battles = sampled(1500, {"base": 600, "lora": 200}, {"base": 0.0, "lora": math.log(3)}, 3.0)
    result = fit(battles, rounds=300)
    lora = result["models"]["lora"]
    assert lora["rating_ci_high"] < 1000 + LOG3 - 50  # raw: length hides most of the lead
    assert covers(lora, "controlled_rating", 1000 + LOG3)


# ------------------------------------------------------------------ agreement with the arena's fit
def test_raw_ratings_are_the_arenas_own_for_the_same_battles():
    rng = np.random.default_rng(3)
    battles, votes = [], []
    for _ in range(80):
        a, b = (str(x) for x in rng.choice(MODELS, 2, replace=False))
        choice = str(rng.choice(["A", "B", "tie"], p=[0.5, 0.3, 0.2]))
        battles.append({"a": a, "b": b, "winner": {"A": "a", "B": "b", "tie": "tie"}[choice],
                        "text_a": "x" * int(rng.integers(5, 50)), "text_b": "y" * 20})
        votes.append({"model_a": a, "model_b": b, "vote": choice})
    mine, arena = fit(battles, rounds=200), ratings.compute_ratings(votes, rounds=200)
    for name in MODELS:
        for key in ("rating", "rating_ci_low", "rating_ci_high", "unbounded", "wins", "ties",
                    "losses"):
            assert mine["models"][name][key] == arena["models"][name][key], (name, key)


def test_the_covariate_fit_without_covariates_is_plain_bradley_terry():
    rng = np.random.default_rng(0)
    n, k = 150, 3
    first = rng.integers(0, k, n)
    second = (first + rng.integers(1, k, n)) % k
    scores = rng.choice([0.0, 0.5, 1.0], n)
    design = np.zeros((n, k))
    design[np.arange(n), first], design[np.arange(n), second] = 1.0, -1.0
    counts = rng.multinomial(n, np.full(n, 1 / n), size=5).astype(float)
    samples = [np.repeat(np.arange(n), c.astype(int)) for c in counts]
    wins = np.stack([ratings._win_matrices(scores, first, second, k, s[None])[0] for s in samples])
    np.testing.assert_allclose(style_control.fit_logistic_batch(design, scores, counts, k),
                               ratings.fit_batch(wins), atol=1e-8)


# ------------------------------------------------------------------ bytes, degenerate input, markdown
def test_same_input_same_bytes_and_the_seed_moves_only_intervals():
    battles = sampled(200, {"base": 200, "lora": 400}, {"base": 0, "lora": 0.5}, 1.0)
    one, again = fit(battles, rounds=200), fit(battles, rounds=200)
    assert json.dumps(one) == json.dumps(again)
    other = fit(battles, rounds=200, seed=1)
    assert other["models"]["lora"]["controlled_rating"] == one["models"]["lora"]["controlled_rating"]
    assert other["models"]["lora"]["controlled_rating_ci_low"] != \
        one["models"]["lora"]["controlled_rating_ci_low"]


def test_degenerate_input_is_answered_clearly():
    empty = fit([])
    assert empty["anchor"] is None and empty["models"] == {} and empty["battles"] == 0
    assert style_control.markdown(empty) == [
        "No style-controlled fit: 0 battle(s), fewer than two models."]
    with pytest.raises(ValueError, match="battle 0: 'lora' against itself"):
        fit([{"a": "lora", "b": "lora", "winner": "a", "text_a": "", "text_b": ""}])
    with pytest.raises(ValueError, match="battle 1: winner 'A' is not 'a', 'b' or 'tie'"):
        fit([{"a": "lora", "b": "base", "winner": "a", "text_a": "", "text_b": ""},
             {"a": "lora", "b": "base", "winner": "A", "text_a": "", "text_b": ""}])
    with pytest.raises(ValueError, match="battle 0: no text_b"):
        fit([{"a": "lora", "b": "base", "winner": "a", "text_a": ""}])


def test_a_model_that_never_lost_is_finite_and_flagged():
    battles = [{"a": "lora", "b": "base", "winner": "a", "text_a": "x" * (10 + i % 7),
                "text_b": "x" * (14 - i % 5)} for i in range(10)]
    result = fit(battles, rounds=200)
    lora = result["models"]["lora"]
    assert result["separated"] and result["controlled_separated"] and lora["unbounded"]
    assert lora["rating"] > 2000 and lora["controlled_rating"] > 1000
    json.dumps(result, allow_nan=False)
    assert "no finite maximum" in "\n".join(style_control.markdown(result))


def test_other_contestants_and_a_missing_anchor():
    # the judge's "author" is no registry model; without base the first model anchors
    battles = [{"a": "author", "b": "lora", "winner": w, "text_a": "a" * 20, "text_b": "b" * 25}
               for w in ("a", "a", "b", "tie")]
    result = fit(battles, rounds=100)
    assert list(result["models"]) == ["lora", "author"] and result["anchor"] == "lora"
    assert result["models"]["lora"]["win_prob"] is None  # the anchor against itself
    assert result["models"]["author"]["win_prob"] == pytest.approx(2.5 / 4, abs=1e-3)


def test_markdown_shows_raw_and_controlled_side_by_side():
    battles = sampled(300, {"base": 200, "lora": 400}, {"base": 0, "lora": 0}, 3.0)
    result = fit(battles, rounds=100)
    text = "\n".join(style_control.markdown(result))
    lora = result["models"]["lora"]
    assert (f"| lora | 300 | {lora['rating']:.0f} | {lora['rating_ci_low']:.0f} … "
            f"{lora['rating_ci_high']:.0f} | {lora['controlled_rating']:.0f} |") in text
    assert "| P(beats base) | style-controlled |" in text
    assert f"| length | {result['coefficients']['length']['coefficient']:+.3f} |" in text
    assert "| headers | — (the same in every pair) | — |" in text
