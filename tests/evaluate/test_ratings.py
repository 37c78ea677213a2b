"""The arena's ratings (voicetune/evaluate/ratings.py) on cases whose answers are known by hand, on a
published Bradley–Terry fit, and the arena stage end to end on an empty and a torn votes file."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from voicetune.evaluate import ratings
from voicetune.evaluate.ratings import ELO, bradley_terry, compute_ratings, wilson
from voicetune.data.votes import counted

from tests.conftest import ROOT, run_stage

ADAPTER = "c89e633d788bf424b1c6eda3e1739be4.dir"
LOG3 = 400 * math.log10(3)  # 190.849...: the Elo gap of 3:1 odds


# the arena stage's rule for arena.adapter: current, with these weights in dvc.lock
CURRENT = counted("current", {"adapters": ADAPTER})


def votes(n: int, a: str, b: str, vote: str, adapter: str = ADAPTER) -> list[dict]:
    return [{"model_a": a, "model_b": b, "vote": vote, "adapter": adapter} for _ in range(n)]


def gap(result: dict, new: str = "lora", old: str = "base") -> float:
    return result["models"][new]["rating"] - result["models"][old]["rating"]


# ------------------------------------------------------------------ hand-computable cases
def test_three_to_one_is_400_log10_3_elo():
    # A beats B 30 times and loses 10: the MLE odds are 3:1, theta gap ln 3
    theta = bradley_terry([[0, 30], [10, 0]], ridge=0)
    assert ELO * (theta[0] - theta[1]) == pytest.approx(LOG3, abs=1e-9)
    # the default weak ridge moves it by 0.0013 Elo; the table rounds to 0.01
    result = compute_ratings(votes(30, "lora", "base", "A") + votes(10, "base", "lora", "A"), CURRENT)
    assert result["models"]["base"]["rating"] == 1000.0
    assert gap(result) == pytest.approx(LOG3, abs=0.01)
    lora = result["models"]["lora"]
    assert (lora["battles"], lora["wins"], lora["ties"], lora["losses"]) == (40, 30, 0, 10)
    assert lora["win_rate"] == 0.75 and not result["separated"] and not lora["unbounded"]


def test_a_tie_is_half_a_win_for_each_side():
    # 20 wins, 20 ties, 0 losses: 30 : 10 in half-wins, the same 3:1 odds
    result = compute_ratings(votes(20, "lora", "base", "A") + votes(20, "base", "lora", "tie"), CURRENT)
    assert gap(result) == pytest.approx(LOG3, abs=0.01)
    lora = result["models"]["lora"]
    assert (lora["wins"], lora["ties"], lora["losses"], lora["win_rate"]) == (20, 20, 0, 0.75)
    assert not result["separated"]  # a tie is a half win both ways: the MLE exists


def test_both_bad_is_counted_apart_and_changes_nothing_else():
    base = votes(30, "lora", "base", "A") + votes(10, "lora", "base", "B")
    with_bad = base + votes(7, "base", "lora", "both_bad")
    plain, result = compute_ratings(base, CURRENT), compute_ratings(with_bad, CURRENT)
    assert result["both_bad"] == 7 and result["used"] == 47
    for name in ("base", "lora"):
        m, p = result["models"][name], plain["models"][name]
        assert m["both_bad"] == 7 and m["battles"] == 47
        assert {k: m[k] for k in ("rating", "rating_ci_low", "rating_ci_high", "wins", "ties",
                                  "losses", "win_rate", "win_rate_ci_low", "win_rate_ci_high")} == \
            {k: p[k] for k in ("rating", "rating_ci_low", "rating_ci_high", "wins", "ties",
                               "losses", "win_rate", "win_rate_ci_low", "win_rate_ci_high")}
    assert result["pairs"]["lora_vs_base"]["both_bad"] == 7


def test_three_models_consistent_odds():
    # lora and fused each beat base 3:1 and draw even with each other: both at 1000 + 190.85
    v = (votes(30, "lora", "base", "A") + votes(10, "lora", "base", "B")
         + votes(30, "fused", "base", "A") + votes(10, "fused", "base", "B")
         + votes(20, "lora", "fused", "A") + votes(20, "lora", "fused", "B"))
    result = compute_ratings(v, CURRENT, models=["base", "lora", "fused"])
    assert gap(result, "lora") == pytest.approx(LOG3, abs=0.01)
    assert gap(result, "fused") == pytest.approx(LOG3, abs=0.01)
    assert list(result["pairs"]) == ["lora_vs_base", "fused_vs_base", "fused_vs_lora"]
    assert result["pairs"]["fused_vs_lora"]["win_rate"] == 0.5


def test_only_votes_for_the_current_adapter_count_unless_all():
    v = votes(30, "lora", "base", "A") + votes(10, "lora", "base", "B") + votes(9, "base", "lora", "A", "old.dir")
    current = compute_ratings(v, CURRENT)
    assert (current["votes"], current["used"], current["other_weights"]) == (49, 40, 9)
    assert gap(current) == pytest.approx(LOG3, abs=0.01)
    everything = compute_ratings(v, None)  # arena.adapter: all
    assert (everything["used"], everything["other_weights"]) == (49, 0)
    assert everything["models"]["base"]["wins"] == 19
    assert gap(everything) == pytest.approx(400 * math.log10(30 / 19), abs=0.01)


def test_unknown_models_and_self_battles_are_counted_not_used():
    v = votes(3, "lora", "base", "A") + votes(1, "gpt", "base", "A") + votes(1, "lora", "lora", "A") \
        + [{"model_a": "lora", "vote": "A", "adapter": ADAPTER}]
    result = compute_ratings(v, CURRENT)
    assert (result["used"], result["invalid"]) == (3, 3)


# ------------------------------------------------------------------ no votes, no battles, separation
def test_no_votes_gives_null_ratings_not_an_error():
    result = compute_ratings([], CURRENT, models=["base", "lora"])
    assert result["votes"] == 0 and result["anchor"] is None and result["pairs"] == {}
    for m in result["models"].values():
        assert m["rating"] is None and m["rating_ci_low"] is None and m["win_rate"] is None
        assert m["battles"] == 0
    assert ratings.table_rows(result)["rows"][0]["rating_ci"] is None


def test_a_model_without_battles_gets_null_ratings():
    result = compute_ratings(votes(3, "lora", "base", "A") + votes(2, "lora", "base", "B"), CURRENT,
                             models=["base", "lora", "fused"])
    fused = result["models"]["fused"]
    assert fused["rating"] is None and fused["rating_ci_high"] is None and fused["battles"] == 0
    assert list(result["pairs"]) == ["lora_vs_base"]
    # only both-bad votes: battles, but nothing to rate
    only_bad = compute_ratings(votes(4, "lora", "base", "both_bad"), CURRENT)
    assert only_bad["models"]["lora"]["battles"] == 4 and only_bad["models"]["lora"]["rating"] is None


def test_without_base_votes_the_first_rated_model_is_the_anchor():
    result = compute_ratings(votes(30, "fused", "lora", "A") + votes(10, "fused", "lora", "B"), CURRENT)
    assert result["anchor"] == "lora" and result["models"]["lora"]["rating"] == 1000.0
    assert gap(result, "fused", "lora") == pytest.approx(LOG3, abs=0.01)


def test_a_model_that_never_lost_gets_a_finite_flagged_rating():
    result = compute_ratings(votes(10, "lora", "base", "A"), CURRENT)
    lora = result["models"]["lora"]
    values = [lora[k] for k in ("rating", "rating_ci_low", "rating_ci_high")]
    assert all(math.isfinite(v) for v in values) and lora["rating"] > 2000  # ~ +1,720 Elo
    assert result["separated"] and lora["unbounded"] and not result["models"]["base"]["unbounded"]
    assert lora["win_rate"] == 1.0 and lora["win_rate_ci_low"] == pytest.approx(0.7225, abs=1e-4)
    assert "lora never lost to base's side" in ratings.table_rows(result)["note"]
    # more wins, higher: the prior keeps it finite and monotone
    assert compute_ratings(votes(20, "lora", "base", "A"), CURRENT)["models"]["lora"]["rating"] > lora["rating"]
    # one model never won against the other two, which split their games: only it is unbounded
    v = votes(5, "lora", "base", "A") + votes(5, "fused", "base", "A") + votes(6, "lora", "fused", "A") \
        + votes(4, "lora", "fused", "B")
    three = compute_ratings(v, CURRENT, models=["base", "lora", "fused"])
    assert three["separated"] and three["anchor"] == "base"
    assert [m for m, r in three["models"].items() if r["unbounded"]] == ["lora", "fused"]
    # the gap between the two that met both ways is still measured: 6:4 odds
    assert gap(three, "lora", "fused") == pytest.approx(400 * math.log10(1.5), abs=0.05)


def test_fit_never_returns_nan():
    # every kind of degenerate win matrix: all-zero, one-sided, a model without games
    for wins in ([[0, 0], [0, 0]], [[0, 5], [0, 0]], [[0, 5, 0], [0, 0, 0], [0, 0, 0]],
                 [[0, 1e6], [0, 0]]):
        theta = bradley_terry(wins)
        assert np.isfinite(theta).all(), wins


# ------------------------------------------------------------------ the bootstrap
def test_bootstrap_is_seeded_and_reproducible():
    v = votes(18, "lora", "base", "A") + votes(11, "lora", "base", "B") + votes(6, "lora", "base", "tie")
    one, again = compute_ratings(v, CURRENT, seed=0), compute_ratings(v, CURRENT, seed=0)
    assert one == again
    other = compute_ratings(v, CURRENT, seed=1)
    assert other["models"]["lora"]["rating"] == one["models"]["lora"]["rating"]
    assert other["models"]["lora"]["rating_ci_low"] != one["models"]["lora"]["rating_ci_low"]
    lora = one["models"]["lora"]
    assert lora["rating_ci_low"] < lora["rating"] < lora["rating_ci_high"]
    # the interval narrows with 4x the votes, by about half
    wide = lora["rating_ci_high"] - lora["rating_ci_low"]
    narrow = compute_ratings(v * 4, CURRENT)["models"]["lora"]
    assert 0.35 < (narrow["rating_ci_high"] - narrow["rating_ci_low"]) / wide < 0.65


def test_500_votes_1000_rounds_fast_enough_for_a_page_refresh():
    rng = np.random.default_rng(0)
    names = ["base", "lora", "fused"]
    v = []
    for _ in range(500):
        a, b = rng.choice(names, 2, replace=False)
        v.append({"model_a": str(a), "model_b": str(b), "adapter": ADAPTER,
                  "vote": str(rng.choice(["A", "B", "tie", "both_bad"], p=[0.4, 0.3, 0.2, 0.1]))})
    start = time.perf_counter()
    result = compute_ratings(v, CURRENT, rounds=1000)
    assert time.perf_counter() - start < 2.0  # about 0.03 s measured on 2 cores
    assert all(m["rating_ci_low"] is not None for m in result["models"].values())


# ------------------------------------------------------------------ published references
# Agresti (2002), Categorical Data Analysis, 2nd ed., Sec. 10.6, Table 10.11: the 1987 American
# League East season, 7 teams (home wins, away wins per fixture), as in the BradleyTerry2 R
# package's `baseball` data (data/baseball.csv); its tests/baseball.Rout.save prints the
# Bradley–Terry fit ignoring home advantage, Baltimore = 0:
BASEBALL = """Milwaukee Detroit 4 3, Milwaukee Toronto 4 2, Milwaukee NewYork 4 3, Milwaukee Boston 6 1,
Milwaukee Cleveland 4 2, Milwaukee Baltimore 6 0, Detroit Milwaukee 3 3, Detroit Toronto 4 2,
Detroit NewYork 4 3, Detroit Boston 6 0, Detroit Cleveland 6 1, Detroit Baltimore 4 3,
Toronto Milwaukee 2 5, Toronto Detroit 4 3, Toronto NewYork 2 4, Toronto Boston 4 3,
Toronto Cleveland 4 2, Toronto Baltimore 6 0, NewYork Milwaukee 3 3, NewYork Detroit 5 1,
NewYork Toronto 2 5, NewYork Boston 4 3, NewYork Cleveland 4 2, NewYork Baltimore 6 1,
Boston Milwaukee 5 1, Boston Detroit 2 5, Boston Toronto 3 3, Boston NewYork 4 2,
Boston Cleveland 5 2, Boston Baltimore 6 0, Cleveland Milwaukee 2 5, Cleveland Detroit 3 3,
Cleveland Toronto 3 4, Cleveland NewYork 4 3, Cleveland Boston 4 2, Cleveland Baltimore 2 4,
Baltimore Milwaukee 2 5, Baltimore Detroit 1 5, Baltimore Toronto 1 6, Baltimore NewYork 2 4,
Baltimore Boston 1 6, Baltimore Cleveland 3 4"""
PUBLISHED = {"Boston": 1.1077, "Cleveland": 0.6839, "Detroit": 1.4364, "Milwaukee": 1.5814,
             "NewYork": 1.2476, "Toronto": 1.2945}


def baseball_wins() -> tuple[list[str], np.ndarray]:
    rows = [r.split() for r in BASEBALL.replace("\n", " ").split(",")]
    teams = sorted({r[0] for r in rows})
    wins = np.zeros((len(teams), len(teams)))
    for home, away, home_wins, away_wins in rows:
        wins[teams.index(home), teams.index(away)] += int(home_wins)
        wins[teams.index(away), teams.index(home)] += int(away_wins)
    return teams, wins


@pytest.mark.parametrize("ridge,tolerance", [(0.0, 5e-5), (ratings.RIDGE, 1e-4)])
def test_agresti_baseball_bradley_terry_coefficients(ridge, tolerance):
    teams, wins = baseball_wins()
    assert len(teams) == 7 and (wins + wins.T)[~np.eye(7, dtype=bool)].min() >= 12  # 13 or so a pair
    theta = bradley_terry(wins, ridge)
    fitted = {t: theta[i] - theta[teams.index("Baltimore")] for i, t in enumerate(teams)}
    for team, published in PUBLISHED.items():
        assert fitted[team] == pytest.approx(published, abs=tolerance), team


def test_wilson_interval_matches_a_published_computation():
    # 6 of 32 (mtcars, mpg >= 25): Wilson 0.08889545 ... 0.35309155, computed in R in
    # https://rstudio-pubs-static.s3.amazonaws.com/1367507_eef7a4d0fb5347a8a820fe3c10141369.html
    low, high = wilson(6, 32)
    assert (low, high) == (pytest.approx(0.08889545, abs=1e-8), pytest.approx(0.35309155, abs=1e-8))
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0 and wilson(0, 0) == (None, None)


# ------------------------------------------------------------------ what is shown
def test_table_markdown_and_plot():
    v = votes(30, "lora", "base", "A") + votes(10, "lora", "base", "B") + votes(2, "lora", "base", "both_bad")
    result = compute_ratings(v, CURRENT)
    table = ratings.table_rows(result)
    assert [r["model"] for r in table["rows"]] == ["base", "lora"]
    lora = table["rows"][1]
    assert lora["rating"] == pytest.approx(1190.85, abs=0.01) and len(lora["rating_ci"]) == 2
    assert (lora["wins"], lora["losses"], lora["both_bad"], lora["win_rate"]) == (30, 10, 2, 0.75)
    assert "42 vote(s) counted; 2 both bad" in table["note"]
    text = "\n".join(ratings.markdown(result, plot="plots/arena.png"))
    assert "| lora | 1191 |" in text and "| 42 | 30 / 0 / 10 | 2 | 75.0% | 59.8% … 85.8% |" in text
    assert "![arena ratings](plots/arena.png)" in text
    png = ratings.plot_png(result)
    assert png.startswith(b"\x89PNG") and png == ratings.plot_png(result)  # stable bytes
    empty = ratings.plot_png(compute_ratings([], CURRENT, models=["base", "lora"]))
    assert empty.startswith(b"\x89PNG") and empty != png
    json.dumps(result, allow_nan=False)  # no NaN anywhere: valid JSON for metrics and the page


# ------------------------------------------------------------------ the stage
def test_stage_with_no_votes_succeeds_and_says_so(tmp_path):
    (tmp_path / "data/arena").mkdir(parents=True)
    (tmp_path / "data/arena/votes.jsonl").write_text("")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_stage("arena.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no votes yet: run make arena" in result.stdout
    metrics = json.loads((tmp_path / "metrics/arena.json").read_text())
    assert metrics["votes"] == 0 and metrics["models"]["lora"]["rating"] is None
    assert (tmp_path / "metrics/plots/arena.png").read_bytes().startswith(b"\x89PNG")


def test_stage_skips_a_torn_line_with_a_warning(tmp_path):
    (tmp_path / "data/arena").mkdir(parents=True)
    good = votes(3, "lora", "base", "A") + votes(2, "base", "lora", "A") + votes(1, "lora", "base", "A", "old")
    (tmp_path / "data/arena/votes.jsonl").write_text(
        "".join(json.dumps(v) + "\n" for v in good) + '{"model_a": "lora", "vo')
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: models/adapters\n      md5: {ADAPTER}\n")
    result = run_stage("arena.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "votes.jsonl:7: not a whole vote (the last line, cut short)" in result.stderr
    assert "Traceback" not in result.stderr
    metrics = json.loads((tmp_path / "metrics/arena.json").read_text())
    assert (metrics["votes"], metrics["used"], metrics["other_weights"], metrics["skipped_lines"]) == (6, 5, 1, 1)
    assert metrics["weights"]["adapters"] == ADAPTER and "| lora |" in result.stdout


LOCK = {"base_model": ("models/base", "b45e.dir"), "train": ("models/adapters", ADAPTER),
        "fuse": ("models/fused", "f05e.dir"), "preference": ("models/preference_adapters", "d90a.dir")}


def write_lock(root, lock=LOCK) -> None:
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n" + "".join(
        f"  {stage}:\n    outs:\n    - path: {path}\n      md5: {md5}\n"
        for stage, (path, md5) in lock.items()))


def page_vote(a: str, b: str, choice: str, **changed) -> dict:
    """A vote as the page writes it, made with the weights of LOCK but ``changed``."""
    current = {"base": "b45e.dir", "adapters": ADAPTER, "fused": "f05e.dir",
               "preference_adapters": "d90a.dir", **changed}
    made_of = {"base": ["base"], "lora": ["base", "adapters"], "fused": ["fused"],
               "dpo": ["fused", "preference_adapters"]}
    return {"schema": 2, "model_a": a, "model_b": b, "vote": choice,
            "weights": {w: current[w] for m in (a, b) for w in made_of[m]},
            "adapter": current["adapters"],
            "preference_adapter": current["preference_adapters"] if "dpo" in (a, b) else None}


def test_stage_counts_no_dpo_vote_made_with_another_preference_adapter(tmp_path):
    """The SFT adapter is the same; the DPO round is not: those votes judged another model."""
    (tmp_path / "data/arena").mkdir(parents=True)
    v = ([page_vote("dpo", "lora", "A")] * 6 + [page_vote("dpo", "lora", "B")] * 2
         + [page_vote("dpo", "lora", "B", preference_adapters="old.dir")] * 9
         + [page_vote("lora", "base", "A", base="oldbase.dir")] * 4  # another base model
         + [page_vote("fused", "base", "A", fused="oldfused.dir")] * 3)
    (tmp_path / "data/arena/votes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in v))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_lock(tmp_path)
    result = run_stage("arena.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics/arena.json").read_text())
    assert (metrics["votes"], metrics["used"], metrics["other_weights"]) == (24, 8, 16)
    dpo = metrics["models"]["dpo"]
    assert (dpo["wins"], dpo["losses"]) == (6, 2)
    assert metrics["models"]["base"]["battles"] == 0 and "fused" not in metrics["models"]
    assert "16 for other weights" in result.stdout


def test_the_page_counts_votes_as_the_stage_does(tmp_path, monkeypatch):
    from voicetune.serve.arena_ratings import ratings_fn
    from voicetune.data.votes import weights_identity

    write_lock(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = {"arena": {"adapter": "current", "models": ["lora", "dpo"], "rounds": 100, "seed": 0}}
    v = [page_vote("dpo", "lora", "A"), page_vote("dpo", "lora", "A", preference_adapters="old.dir")]
    table = ratings_fn(params, weights_identity("."))(v)
    assert [r["battles"] for r in table["rows"]] == [1, 1]
    assert "1 for other weights" in table["note"]
    assert [r["battles"] for r in ratings_fn({**params, "arena": {**params["arena"], "adapter": "all"}},
                                             weights_identity("."))(v)["rows"]] == [2, 2]


def test_the_arena_stage_depends_on_every_weight_file_a_vote_names():
    import yaml

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["arena"]["deps"]
    for path in ("models/base", "models/adapters", "models/fused", "models/preference_adapters"):
        assert path in deps, path  # a retrain (SFT or DPO) must rerun the ratings
    from voicetune.data.votes import WEIGHTS

    assert {path for _, path in WEIGHTS.values()} <= set(deps)


# ------------------------------------------------------------------ style control and the voice column
def texted(n: int, a: str, b: str, vote: str, len_a: int, len_b: int) -> list[dict]:
    return [{**v, "answer_a": "x" * len_a, "answer_b": "x" * len_b} for v in votes(n, a, b, vote)]


def length_decided_votes(n: int = 900, seed: int = 0) -> list[dict]:
    """Equal models, lora writing twice base's length; P(a wins) = sigmoid(3 f_length)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = ("lora", "base") if rng.random() < 0.5 else ("base", "lora")
        len_a, len_b = (int(rng.lognormal(math.log(400 if m == "lora" else 200), 0.35)) + 1
                        for m in (a, b))
        p = 1 / (1 + math.exp(-3 * (len_a - len_b) / (len_a + len_b)))
        out += texted(1, a, b, "A" if rng.random() < p else "B", len_a, len_b)
    return out


NEW_MODEL_KEYS = {"controlled_rating", "controlled_rating_ci_low", "controlled_rating_ci_high"}


def without_style(result: dict) -> dict:
    return {**{k: v for k, v in result.items() if k != "style_control"},
            "models": {n: {k: v for k, v in m.items() if k not in NEW_MODEL_KEYS}
                       for n, m in result["models"].items()}}


def test_style_control_takes_out_a_length_preference():
    result = compute_ratings(length_decided_votes(), CURRENT)
    lora, style = result["models"]["lora"], result["style_control"]
    assert lora["rating_ci_low"] > 1050  # raw: the longer model looks better
    assert lora["controlled_rating_ci_low"] < 1000 < lora["controlled_rating_ci_high"]
    assert abs(lora["controlled_rating"] - 1000) < 40
    assert style["coefficients"]["length"]["ci_low"] > 1.5 and style["votes"] == 900
    assert (style["without_texts"], style["anchor"], style["separated"]) == (0, "base", False)
    assert result["models"]["base"]["controlled_rating"] == 1000.0


def test_votes_without_texts_count_raw_and_are_left_out_of_style_control():
    old = votes(30, "lora", "base", "A") + votes(10, "lora", "base", "B")
    new = texted(12, "lora", "base", "A", 50, 40) + texted(8, "lora", "base", "B", 30, 45) \
        + texted(3, "lora", "base", "both_bad", 10, 10)
    result = compute_ratings(old + new, CURRENT)
    assert result["used"] == 63 and result["models"]["lora"]["wins"] == 42  # all counted raw
    assert (result["style_control"]["votes"], result["style_control"]["without_texts"]) == (20, 40)
    assert result["models"]["lora"]["controlled_rating"] is not None
    assert "over 20 vote(s) that recorded both answers (40 older vote(s) without them left out)" \
        in ratings.summary_note(result)
    # the answers' texts change no raw figure: every key metrics/arena.json had is as before
    stripped = [{k: v for k, v in vote.items() if not k.startswith("answer_")} for vote in old + new]
    plain = compute_ratings(stripped, CURRENT)
    assert without_style(plain) == without_style(result)
    assert plain["style_control"]["votes"] == 0 and plain["models"]["lora"]["controlled_rating"] is None
    # none with the anchor: no controlled ratings rather than ones on another scale
    other = compute_ratings(votes(5, "lora", "base", "A") + votes(3, "base", "lora", "A")
                            + texted(4, "fused", "lora", "A", 9, 9) + texted(2, "lora", "fused", "A", 9, 9),
                            CURRENT, models=["base", "lora", "fused"])
    assert other["anchor"] == "base" and other["style_control"]["anchor"] is None
    assert all(m["controlled_rating"] is None for m in other["models"].values())


def test_no_votes_keeps_every_old_key_and_adds_style_control():
    result = compute_ratings([], CURRENT, models=["base", "lora"])
    assert result["style_control"] == {"votes": 0, "without_texts": 0, "anchor": None,
                                       "separated": False, "coefficients": {
                                           "length": None, "headers": None, "list_items": None,
                                           "bold": None}}
    assert list(result)[:-1] == ["votes", "used", "other_weights", "invalid", "skipped_lines",
                                 "both_bad", "weights", "anchor", "rounds", "seed", "separated",
                                 "models", "pairs"]


VOICE = {"base": {"score": 0.21, "gap_closed": 0.0}, "lora": {"score": 0.58, "gap_closed": 0.4567},
         "author": {"score": 0.9, "gap_closed": 1.0},
         # the voice stage's form: the share with its interval
         "dpo": {"score": 0.6, "gap_closed": {"value": 0.52, "ci95_low": 0.44, "ci95_high": 0.61}}}


def test_voice_column_when_given_and_nothing_otherwise():
    result = compute_ratings(texted(30, "lora", "base", "A", 50, 50) + texted(10, "lora", "base", "B", 50, 50)
                             + votes(2, "fused", "base", "A"), CURRENT, models=["base", "lora", "fused"])
    plain = ratings.markdown(result)
    assert not any("voice" in line for line in plain)
    assert all("voice_score" not in row for row in ratings.table_rows(result)["rows"])
    text = ratings.markdown(result, voice=VOICE)
    assert text[2].endswith("| voice score (share of the base→author gap closed) |")
    assert text[3].count("---") == 11
    lora = next(line for line in text if line.startswith("| lora |"))
    assert lora.endswith("| 0.58 (46% of the gap) |")
    assert next(line for line in text if line.startswith("| fused |")).endswith("| — |")
    assert [line.rsplit(" |", 2)[0] for line in text[4:7]] == \
        [line.rsplit(" |", 1)[0] for line in plain[4:7]]  # the other columns as without voice
    dpo = next(line for line in ratings.markdown(compute_ratings(votes(3, "dpo", "lora", "A"), None),
                                                voice=VOICE) if line.startswith("| dpo |"))
    assert dpo.endswith("| 0.60 (52% of the gap, 95% CI 44% … 61%) |")
    rows = {r["model"]: r for r in ratings.table_rows(result, VOICE)["rows"]}
    from voicetune.serve.arena_ratings import ratings_fn  # the page's table passes it through

    params = {"arena": {"adapter": "all", "models": ["base", "lora"], "rounds": 50, "seed": 0}}
    assert ratings_fn(params, None, VOICE)(votes(2, "lora", "base", "A"))["rows"][1]["voice_score"] == 0.58
    assert (rows["lora"]["voice_score"], rows["lora"]["voice_gap_closed"]) == (0.58, 0.4567)
    assert rows["lora"]["voice_gap_closed_ci"] is None
    assert rows["fused"]["voice_score"] is None and "author" not in rows
    assert rows["lora"]["controlled_rating_ci"] is not None and rows["fused"]["controlled_rating"] is None


def test_stage_adds_style_control_and_reads_the_voice_scores(tmp_path):
    (tmp_path / "data/arena").mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    v = texted(6, "lora", "base", "A", 80, 40) + texted(3, "base", "lora", "A", 60, 50) \
        + votes(4, "lora", "base", "B")
    (tmp_path / "data/arena/votes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in v))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: models/adapters\n      md5: {ADAPTER}\n")
    (tmp_path / "metrics/voice.json").write_text(json.dumps({"models": VOICE, "auc": 0.9}))
    result = run_stage("arena.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics/arena.json").read_text())
    assert (metrics["style_control"]["votes"], metrics["style_control"]["without_texts"]) == (9, 4)
    assert metrics["models"]["lora"]["controlled_rating"] is not None
    assert metrics["voice"] == {m: VOICE[m] for m in ("base", "lora")}  # the listed models'
    assert "| 0.58 (46% of the gap) |" in result.stdout
    (tmp_path / "metrics/voice.json").unlink()
    assert run_stage("arena.py", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "metrics/arena.json").read_text())["voice"] is None
