"""Style control: Bradley–Terry ratings with the answers' length and markdown as covariates.

Raw preferences reward length (AlpacaEval LC; Chatbot Arena's style control): a rating that
moves with answer length says as much about verbosity as about quality. As LMSYS does, the
battles are fitted as one logistic regression

    P(a beats b) = sigmoid(theta_a - theta_b + sum_k beta_k * f_k),
    f_k = (x_a - x_b) / (x_a + x_b)      (0 when both are 0)

where x is a style feature of each answer (``style_features``: characters, markdown headers,
list items, bold spans), so f_k lies in [-1, 1] and +1 means only a's answer has any. The
style-controlled rating is theta read with every f_k set to zero: what a model wins when its
answer is as long and as formatted as its opponent's. beta_k is in logits per unit of f_k
(unlike LMSYS, not per standard deviation: the unit then means the same on every data set).

Everything else is the arena's (``voicetune.evaluate.ratings``): a tie is half a win for
each side, the same Elo scale (anchor = 1000), the same weak ridge, and seeded bootstrap 95%
intervals, the raw and the controlled fit refitted on the same resamples. The raw ratings are
``ratings.fit_batch``'s, so on the same battles they equal the arena table's. The ridge acts
on beta too: when style alone decides every vote (the longer answer always won), beta has no
finite maximum and nothing is left to tell the models apart; the ridge keeps beta finite, the
models' controlled ratings then get wide intervals around the anchor, and
``controlled_separated`` (a linear program: ``separated``) says that no finite fit exists.
"""
from __future__ import annotations

import re

import numpy as np

from voicetune.evaluate.ratings import ELO, RIDGE, _win_matrices, fit_batch, newton_ascent, reachable
from voicetune.models.registry import NAMES

FEATURES = ("length", "headers", "list_items", "bold")
_HEADER = re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.M)
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+\S", re.M)
_BOLD = re.compile(r"\*\*(?=\S)[^*\n]+?\*\*|__(?=\S)[^_\n]+?__")
_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}


def style_features(text: str) -> dict[str, float]:
    """Characters, markdown headers, list items (bulleted or numbered) and bold spans."""
    return {"length": float(len(text)), "headers": float(len(_HEADER.findall(text))),
            "list_items": float(len(_LIST_ITEM.findall(text))),
            "bold": float(len(_BOLD.findall(text)))}


def style_differences(text_a: str, text_b: str) -> np.ndarray:
    """f_k = (x_a - x_b) / (x_a + x_b) for each of FEATURES (0 when both are 0)."""
    a, b = style_features(text_a), style_features(text_b)
    x_a, x_b = np.array([a[k] for k in FEATURES]), np.array([b[k] for k in FEATURES])
    total = x_a + x_b
    return np.divide(x_a - x_b, total, out=np.zeros(len(FEATURES)), where=total > 0)


# ------------------------------------------------------------------------------ the fit
def _objective(w, design, scores, counts, k, ridge):
    z = w @ design.T
    # s log(1 + e^-z) + (1 - s) log(1 + e^z), with log(1 + e^z) = log(1 + e^-z) + z; this
    # log(1 + e^-z) never overflows and took a third of np.logaddexp's time
    softplus = np.maximum(-z, 0.0) + np.log1p(np.exp(-np.abs(z)))
    loglik = -(counts * (softplus + (1 - scores) * z)).sum(1)
    # (sum theta)**2 / 2 pins the free shift of theta, as in ratings._objective
    return loglik - ridge / 2 * (w ** 2).sum(1) - w[:, :k].sum(1) ** 2 / 2


def fit_logistic_batch(design: np.ndarray, scores: np.ndarray, counts: np.ndarray, k: int,
                       ridge: float = RIDGE, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """Weights (rows, d) of the penalized logistic model for each row of ``counts``.

    ``design[n]``: battle n's row, +1 in a's column and -1 in b's (the first ``k`` columns,
    abilities summing to 0), then its covariates; ``scores[n]``: 1 a won, 0.5 tie, 0 b won;
    ``counts[r, n]``: how often battle n is in resample r. Newton's method with step halving,
    as ``ratings.fit_batch`` (which this equals when there are no covariates)."""
    design, scores = np.asarray(design, float), np.asarray(scores, float)
    counts = np.atleast_2d(np.asarray(counts, float))
    d = design.shape[1]
    ridge = max(ridge, 1e-12)
    pin = np.zeros(d)
    pin[:k] = 1.0
    outer = (design[:, :, None] * design[:, None, :]).reshape(len(design), d * d)

    def newton_step(w):
        p = 0.5 * (1 + np.tanh((w @ design.T) / 2))  # P(a beats b), overflow-free
        grad = (counts * (scores - p)) @ design - ridge * w - w[:, :k].sum(1, keepdims=True) * pin
        hessian = ((counts * p * (1 - p)) @ outer).reshape(-1, d, d)  # one matrix product
        neg_hessian = hessian + ridge * np.eye(d) + np.outer(pin, pin)
        return np.linalg.solve(neg_hessian, grad[:, :, None])[:, :, 0]

    return newton_ascent(lambda w: _objective(w, design, scores, counts, k, ridge), newton_step,
                         np.zeros((len(counts), d)), tol, max_iter)


def separated(design: np.ndarray, scores: np.ndarray, fixed: int) -> bool:
    """True when no finite maximum-likelihood fit exists: some direction w (column ``fixed``
    held at 0) never lowers a decided battle's winner's margin, raises some, and leaves every
    tie's unchanged (a linear program, scipy's HiGHS)."""
    from scipy.optimize import linprog

    decided = scores != 0.5
    margins = np.where(scores[decided] == 1.0, 1.0, -1.0)[:, None] * design[decided]
    if not len(margins):
        return False
    ties = design[~decided]
    bounds = [(0.0, 0.0) if j == fixed else (-1.0, 1.0) for j in range(design.shape[1])]
    lp = linprog(-margins.sum(0), A_ub=-margins, b_ub=np.zeros(len(margins)),
                 A_eq=ties if len(ties) else None, b_eq=np.zeros(len(ties)) if len(ties) else None,
                 bounds=bounds, method="highs")
    return bool(lp.status == 0 and -lp.fun > 1e-9)


def _order(battles: list[dict]) -> list[str]:
    """The models: the registry's in its order, then any other (e.g. "author") as first met."""
    seen = list(dict.fromkeys(m for b in battles for m in (b["a"], b["b"])))
    return [m for m in NAMES if m in seen] + [m for m in seen if m not in NAMES]


def _check(battles: list[dict]) -> None:
    for i, b in enumerate(battles):
        missing = [key for key in ("a", "b", "winner", "text_a", "text_b") if key not in b]
        if missing:
            raise ValueError(f"battle {i}: no {', '.join(missing)} (each battle needs a, b, "
                             "winner, text_a and text_b)")
        if b["a"] == b["b"]:
            raise ValueError(f"battle {i}: {b['a']!r} against itself")
        if b["winner"] not in _SCORE:
            raise ValueError(f"battle {i}: winner {b['winner']!r} is not 'a', 'b' or 'tie'")
        if not isinstance(b["text_a"], str) or not isinstance(b["text_b"], str):
            raise ValueError(f"battle {i}: text_a and text_b must be strings")


def _interval(column: np.ndarray, digits: int):
    column = column[~np.isnan(column)]
    if not column.size:
        return None, None
    low, high = np.percentile(column, [2.5, 97.5])
    return round(float(low), digits), round(float(high), digits)


def _elo(theta: np.ndarray, anchor: int) -> np.ndarray:
    return 1000 + ELO * (theta - theta[..., anchor:anchor + 1])


def controlled(battles: list[dict], *, anchor: str | None = None, rounds: int = 1000,
               seed: int = 0, ridge: float = RIDGE, samples: np.ndarray | None = None) -> dict:
    """The style-controlled fit of ``battles`` (``fit``'s format): each model's rating with
    the style differences set to zero, and each covariate's coefficient, with bootstrap 95%
    intervals (``samples[r]``: the battles of resample r; drawn from ``seed`` when None).
    ``anchor``: rated 1000 (when absent, the first model of ``_order``)."""
    _check(battles)
    models = _order(battles)
    if len(models) < 2:
        return {"battles": len(battles), "anchor": None, "separated": False, "models": {},
                "coefficients": {f: None for f in FEATURES}}
    index = {m: i for i, m in enumerate(models)}
    anchor = anchor if anchor in index else models[0]
    a, k, n = index[anchor], len(models), len(battles)
    design = np.zeros((n, k + len(FEATURES)))
    design[np.arange(n), [index[b["a"]] for b in battles]] = 1.0
    design[np.arange(n), [index[b["b"]] for b in battles]] = -1.0
    design[:, k:] = [style_differences(b["text_a"], b["text_b"]) for b in battles]
    scores = np.array([_SCORE[b["winner"]] for b in battles])
    if samples is None:
        samples = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    counts = np.bincount((np.arange(len(samples))[:, None] * n + samples).ravel(),
                         minlength=len(samples) * n).reshape(len(samples), n).astype(float)

    w = fit_logistic_batch(design, scores, np.ones((1, n)), k, ridge)[0]
    boot = fit_logistic_batch(design, scores, counts, k, ridge)
    # a model without a game in a resample has no rating there (nor anything anchored on it)
    played = counts @ np.abs(design[:, :k]) > 0
    elo = np.where(played & played[:, a:a + 1], _elo(boot[:, :k], a), np.nan)
    rating = _elo(w[:k], a)
    varies = np.abs(design[:, k:]).max(0) > 0
    result = {"battles": n, "anchor": anchor, "separated": separated(design, scores, a),
              "models": {}, "coefficients": {}}
    for m, i in index.items():
        low, high = _interval(elo[:, i], 2)
        result["models"][m] = {"rating": round(float(rating[i]), 2), "rating_ci_low": low,
                               "rating_ci_high": high}
    for j, feature in enumerate(FEATURES):
        if not varies[j]:  # the same in every pair: nothing to estimate
            result["coefficients"][feature] = None
            continue
        low, high = _interval(boot[:, k + j], 4)
        result["coefficients"][feature] = {"coefficient": round(float(w[k + j]), 4),
                                           "ci_low": low, "ci_high": high}
    return result


def win_probability(rating: float | None) -> float | None:
    """P(beats the anchor) of a rating on the Elo scale (anchor = 1000)."""
    return None if rating is None else round(1 / (1 + 10 ** (-(rating - 1000) / 400)), 4)


def fit(battles: list[dict], *, anchor: str = "base", rounds: int = 1000, seed: int = 0,
        ridge: float = RIDGE) -> dict:
    """Raw and style-controlled Bradley–Terry ratings of ``battles``, each
    ``{"a": model, "b": model, "winner": "a" | "b" | "tie", "text_a": str, "text_b": str}``.

    Per model: ``rating`` (no covariates) and ``controlled_rating`` (covariates fitted, read at
    zero), on the Elo scale (``anchor`` = 1000; when it has no battle, the first model), each
    with a 95% bootstrap interval (``*_ci_low``/``*_ci_high``); ``win_prob`` and
    ``controlled_win_prob``: P(model beats the anchor), raw and with equal style (None for
    the anchor). ``coefficients``: each covariate's beta in logits with its interval (None
    when it is the same in every pair). ``separated`` / ``controlled_separated``: no finite
    fit exists (a model never lost, or style alone decides every battle); the weak ridge then
    keeps the numbers finite, and they give a direction, not a size."""
    _check(battles)
    models = _order(battles)
    empty = {"battles": len(battles), "anchor": None, "rounds": rounds, "seed": seed,
             "features": list(FEATURES), "separated": False, "controlled_separated": False,
             "coefficients": {f: None for f in FEATURES}, "models": {}}
    if len(models) < 2:
        return empty
    index = {m: i for i, m in enumerate(models)}
    anchor = anchor if anchor in index else models[0]
    a, k, n = index[anchor], len(models), len(battles)
    first = np.array([index[b["a"]] for b in battles])
    second = np.array([index[b["b"]] for b in battles])
    scores = np.array([_SCORE[b["winner"]] for b in battles])
    samples = np.random.default_rng(seed).integers(0, n, size=(rounds, n))

    # raw: the arena's own fit (ratings.compute_ratings draws the same resamples)
    whole = _win_matrices(scores, first, second, k, np.arange(n)[None])
    theta = fit_batch(whole, ridge)[0]
    reach = reachable(whole[0])
    boot_wins = _win_matrices(scores, first, second, k, samples)
    boot = fit_batch(boot_wins, ridge)
    played = (boot_wins + boot_wins.transpose(0, 2, 1)).sum(2) > 0
    elo = np.where(played & played[:, a:a + 1], _elo(boot, a), np.nan)
    raw = _elo(theta, a)

    style = controlled(battles, anchor=anchor, ridge=ridge, samples=samples)
    result = {**empty, "anchor": anchor, "separated": not reach.all(),
              "controlled_separated": style["separated"], "coefficients": style["coefficients"]}
    for m, i in index.items():
        mine = [b for b in battles if m in (b["a"], b["b"])]
        won = sum((b["winner"] == "a") == (b["a"] == m) for b in mine if b["winner"] != "tie")
        ties = sum(b["winner"] == "tie" for b in mine)
        low, high = _interval(elo[:, i], 2)
        c = style["models"][m]
        row = {"battles": len(mine), "wins": won, "ties": ties, "losses": len(mine) - won - ties,
               "rating": round(float(raw[i]), 2), "rating_ci_low": low, "rating_ci_high": high,
               "unbounded": not (reach[a, i] and reach[i, a]),
               "controlled_rating": c["rating"], "controlled_rating_ci_low": c["rating_ci_low"],
               "controlled_rating_ci_high": c["rating_ci_high"]}
        for prefix, key in (("", "rating"), ("controlled_", "controlled_rating")):
            for end in ("", "_ci_low", "_ci_high"):
                row[f"{prefix}win_prob{end}"] = (None if m == anchor
                                                 else win_probability(row[key + end]))
        result["models"][m] = row
    return result


# ------------------------------------------------------------------------------ showing it
def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _ci(low, high, fmt: str) -> str:
    return "—" if low is None else f"{format(low, fmt)} … {format(high, fmt)}"


def coefficient_lines(coefficients: dict) -> list[str]:
    """The covariates' coefficients as a markdown table."""
    lines = ["| style covariate | coefficient (logits) | 95% CI |", "|---|---|---|"]
    for feature, c in coefficients.items():
        if c is None:
            lines.append(f"| {feature} | — (the same in every pair) | — |")
        else:
            lines.append(f"| {feature} | {c['coefficient']:+.3f} | "
                         f"{_ci(c['ci_low'], c['ci_high'], '+.3f')} |")
    return lines


def markdown(result: dict) -> list[str]:
    """``fit``'s result as markdown lines: raw vs style-controlled ratings and win
    probabilities against the anchor, then the covariates' coefficients."""
    if result["anchor"] is None:
        return [f"No style-controlled fit: {result['battles']} battle(s), fewer than two models."]
    anchor = result["anchor"]
    lines = [f"Bradley–Terry ratings on the Elo scale ({anchor} = 1000) over {result['battles']} "
             f"battle(s), raw and style-controlled (length and markdown differences as covariates, "
             f"read at zero), 95% bootstrap intervals ({result['rounds']} resamples, seed "
             f"{result['seed']}).", "",
             f"| model | battles | rating | 95% CI | style-controlled | 95% CI | P(beats {anchor}) "
             "| style-controlled |", "|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | {m['battles']} | {_num(m['rating'], '.0f')}"
            f"{' *' if m['unbounded'] else ''} "
            f"| {_ci(m['rating_ci_low'], m['rating_ci_high'], '.0f')} "
            f"| {_num(m['controlled_rating'], '.0f')} "
            f"| {_ci(m['controlled_rating_ci_low'], m['controlled_rating_ci_high'], '.0f')} "
            f"| {_num(m['win_prob'], '.1%')} | {_num(m['controlled_win_prob'], '.1%')} |")
    lines += [""] + coefficient_lines(result["coefficients"])
    which = " and ".join(name for name, flag in (("raw", result["separated"]),
                         ("style-controlled", result["controlled_separated"])) if flag)
    if which:
        lines += ["", f"\\* The {which} fit has no finite maximum (a model never lost, or style "
                      "alone decides every battle): a weak prior holds it finite; the numbers give "
                      "the direction, not the size."]
    return lines
