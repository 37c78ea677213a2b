"""Ratings from the arena's blind votes: win rates and Bradley–Terry ratings with intervals.

One function, ``compute_ratings``, serves the ``arena`` stage (metrics/arena.json, the plot,
the report) and the arena page's table, so both show the same numbers.

- A vote is one battle between two models; "A"/"B" means that side won, a tie is half a win
  for each side, and "both_bad" is counted apart: it says nothing about which is better, so
  it enters neither the win rate nor the fit.
- Win rate = (wins + ties/2) / (wins + ties + losses), with a 95% Wilson score interval
  (on the tie-as-half count; it stays inside [0, 1] and is sane at 0 or n wins, unlike the
  normal approximation).
- Bradley–Terry: P(i beats j) = 1 / (1 + exp(theta_j - theta_i)), fitted by maximum
  likelihood (Newton's method with step halving, numpy: 2-3 models need no library; LMSYS
  fits the same model as a logistic regression), shown on the Elo scale
  ``1000 + 400/ln(10) * (theta - theta_base)``, so base = 1000 and 400 points mean 10:1 odds.
- When a model never lost (or never won) the maximum-likelihood rating is infinite. The fit
  therefore always carries a weak ridge, ``RIDGE / 2 * sum(theta**2)`` (a normal prior with a
  standard deviation of 100 logits): it moves a 30-10 record by 0.0013 Elo, and turns a 10-0
  record into a finite but very large gap (about +1,720 Elo) instead of infinity or NaN.
  ``separated`` says when that happened, and a model's ``unbounded`` which ratings it set:
  such a rating says "never lost" (or "never won"), not how much better.
- 95% intervals: seeded bootstrap over the decided votes (resample with replacement, refit,
  2.5 and 97.5 percentiles), all rounds fitted at once as one batch of small Newton problems:
  500 votes x 1,000 rounds take about 25 ms, fast enough for the page's every refresh.
- Style control (``voicetune.evaluate.style_control``): the same votes fitted again with the
  two answers' length and markdown differences as covariates, each model's rating read with
  them at zero (``controlled_rating``), and the covariates' coefficients (``style_control``).
  Only votes that recorded both answers' texts enter it; older ones are counted
  (``style_control.without_texts``) and stay in the raw fit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from voicetune.models.registry import NAMES  # every model a vote may name, in display order

ANCHOR = "base"  # rated 1000 (else the first rated model of NAMES)
ELO = 400 / math.log(10)  # logits -> Elo points
RIDGE = 1e-4
Z95 = 1.959963984540054  # two-sided 95% normal quantile
VOICE = Path("metrics/voice.json")  # the voice score per model (the voice stage's)


# ------------------------------------------------------------------------------ the fit
def _objective(theta: np.ndarray, wins: np.ndarray, ridge: float) -> np.ndarray:
    """Penalized log-likelihood per batch row. ``(sum theta)**2 / 2`` pins the free shift of
    theta (the likelihood ignores it; with a ridge the optimum has sum 0 anyway)."""
    diff = theta[:, :, None] - theta[:, None, :]
    loglik = -(wins * np.logaddexp(0.0, -diff)).sum(axis=(1, 2))
    return loglik - ridge / 2 * (theta ** 2).sum(1) - theta.sum(1) ** 2 / 2


def newton_ascent(objective: Callable[[np.ndarray], np.ndarray],
                  newton_step: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                  tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """The maximum of a concave ``objective`` for each row of ``x`` (a batch of problems):
    Newton steps, each halved until it improves every row (plain Newton can overshoot when a
    win probability nears 1). Serves the plain fit here and the style-controlled one."""
    value = objective(x)
    for _ in range(max_iter):
        step = newton_step(x)
        t = np.ones(len(x))
        for _ in range(60):
            candidate = x + t[:, None] * step
            new = objective(candidate)
            ok = new >= value - 1e-12 * (1 + np.abs(value))
            if ok.all():
                break
            t = np.where(ok, t, t / 2)
        x, value = candidate, new
        if np.abs(t[:, None] * step).max() < tol:
            break
    return x


def fit_batch(wins: np.ndarray, ridge: float = RIDGE, tol: float = 1e-10,
              max_iter: int = 200) -> np.ndarray:
    """Bradley–Terry abilities (logits, summing to 0) for each of a batch of win matrices.

    ``wins[r, i, j]`` is how often i beat j in row r (a tie adds 0.5 to both directions).
    Newton's method on the concave penalized log-likelihood (``newton_ascent``)."""
    wins = np.asarray(wins, dtype=float)
    rows, k, _ = wins.shape
    games = wins + wins.transpose(0, 2, 1)
    ridge = max(ridge, 1e-12)  # keeps a model without games solvable when ridge is 0

    def newton_step(theta):
        # p[r, i, j] = P(i beats j), the logistic function written so it never overflows
        p = 0.5 * (1 + np.tanh((theta[:, :, None] - theta[:, None, :]) / 2))
        grad = wins.sum(2) - (games * p).sum(2) - ridge * theta - theta.sum(1, keepdims=True)
        v = games * p * (1 - p)
        neg_hessian = (np.eye(k) * (v.sum(2) + ridge)[:, :, None]) - v + 1.0
        return np.linalg.solve(neg_hessian, grad[:, :, None])[:, :, 0]

    return newton_ascent(lambda theta: _objective(theta, wins, ridge), newton_step,
                         np.zeros((rows, k)), tol, max_iter)


def bradley_terry(wins, ridge: float = RIDGE) -> np.ndarray:
    """Abilities (logits, summing to 0) for one win matrix ``wins[i, j]``."""
    return fit_batch(np.asarray(wins, dtype=float)[None], ridge)[0]


def reachable(wins: np.ndarray) -> np.ndarray:
    """``reach[i, j]``: a chain "i beat x, x beat y, ..., beat j" exists (ties count both ways)."""
    k = len(wins)
    reach = (np.asarray(wins) > 0) | np.eye(k, dtype=bool)
    for m in range(k):  # Floyd–Warshall on booleans
        reach = reach | (reach[:, m:m + 1] & reach[m:m + 1, :])
    return reach


def separated(wins: np.ndarray) -> bool:
    """True when the maximum-likelihood fit does not exist (Ford 1957): the models split in
    two groups where one group never beat the other, i.e. some model cannot reach another."""
    return not reachable(wins).all()


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval for a proportion (successes may be fractional: ties count half)."""
    if n <= 0:
        return None, None
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


# ------------------------------------------------------------------------------ the votes
def _battle(vote: dict) -> tuple[str, str, str] | None:
    """(model_a, model_b, choice) of a usable vote, or None (unknown model, a model against
    itself, no choice)."""
    a, b, choice = vote.get("model_a"), vote.get("model_b"), vote.get("vote")
    if a not in NAMES or b not in NAMES or a == b or choice not in ("A", "B", "tie", "both_bad"):
        return None
    return a, b, choice


def _record(games: list[tuple[str, str, str]], model: str) -> dict:
    """Battles, wins, ties, losses and both-bad of ``model`` in ``games``, with its win rate."""
    wins = ties = losses = both_bad = 0
    for a, b, choice in games:
        if model not in (a, b):
            continue
        if choice == "both_bad":
            both_bad += 1
        elif choice == "tie":
            ties += 1
        elif (choice == "A") == (model == a):
            wins += 1
        else:
            losses += 1
    decided = wins + ties + losses
    low, high = wilson(wins + ties / 2, decided)
    return {"battles": decided + both_bad, "wins": wins, "ties": ties, "losses": losses,
            "both_bad": both_bad,
            "win_rate": _round((wins + ties / 2) / decided, 4) if decided else None,
            "win_rate_ci_low": _round(low, 4), "win_rate_ci_high": _round(high, 4)}


def _round(x, digits: int):
    return None if x is None else round(float(x), digits)


def _win_matrices(scores: np.ndarray, first: np.ndarray, second: np.ndarray, k: int,
                  samples: np.ndarray) -> np.ndarray:
    """Win matrices of each resample: ``samples[r]`` lists the games of row r (indices)."""
    rows, n = samples.shape
    r = np.repeat(np.arange(rows), n)
    g = samples.ravel()
    flat = np.concatenate([(r * k + first[g]) * k + second[g], (r * k + second[g]) * k + first[g]])
    weights = np.concatenate([scores[g], 1 - scores[g]])
    return np.bincount(flat, weights, minlength=rows * k * k).reshape(rows, k, k)


def compute_ratings(votes: list[dict], current: Callable[[dict], bool] | None = None, *,
                    weights: dict | None = None,
                    models: list[str] | tuple[str, ...] | None = None, rounds: int = 1000,
                    seed: int = 0, skipped_lines: int = 0, ridge: float = RIDGE) -> dict:
    """The ratings table of ``votes``: only the votes ``current(vote)`` says were made with the
    current weights (``votes.counted``), or all votes (None). ``weights``: the current weights' identities,
    recorded in the result. ``models``: the models always listed (arena.models), with or
    without votes; any other model with battles is listed too. A model without decided battles
    has null ratings. ``skipped_lines``: torn lines of the votes file, reported in the totals."""
    usable, counted_votes, other_weights, invalid = [], [], 0, 0
    for vote in votes:
        if current is not None and not current(vote):
            other_weights += 1
            continue
        battle = _battle(vote)
        if battle is None:
            invalid += 1
        else:
            usable.append(battle)
            counted_votes.append(vote)
    present = {m for a, b, _ in usable for m in (a, b)}
    listed = [m for m in NAMES if m in (models or ()) or m in present]

    decided = [(a, b, c) for a, b, c in usable if c != "both_bad"]
    texted = [v for v in counted_votes if _battle(v)[2] != "both_bad"
              and isinstance(v.get("answer_a"), str) and isinstance(v.get("answer_b"), str)]
    rated = [m for m in NAMES if any(m in (a, b) for a, b, _ in decided)]
    index = {m: i for i, m in enumerate(rated)}
    anchor = ANCHOR if ANCHOR in index else (rated[0] if rated else None)
    result = {
        "votes": len(votes), "used": len(usable), "other_weights": other_weights,
        "invalid": invalid, "skipped_lines": skipped_lines,
        "both_bad": len(usable) - len(decided), "weights": weights, "anchor": anchor,
        "rounds": rounds, "seed": seed, "separated": False, "models": {}, "pairs": {},
    }

    ratings = {m: (None, None, None, False) for m in listed}
    if len(rated) >= 2:
        k = len(rated)
        first = np.array([index[a] for a, _, _ in decided])
        second = np.array([index[b] for _, b, _ in decided])
        scores = np.array([{"A": 1.0, "B": 0.0, "tie": 0.5}[c] for _, _, c in decided])
        n = len(decided)
        whole = _win_matrices(scores, first, second, k, np.arange(n)[None])
        theta = fit_batch(whole, ridge)[0]
        reach = reachable(whole[0])
        result["separated"] = not reach.all()
        rng = np.random.default_rng(seed)
        samples = rng.integers(0, n, size=(rounds, n))
        boot_wins = _win_matrices(scores, first, second, k, samples)
        boot = fit_batch(boot_wins, ridge)
        # a model that drew no game in a resample has no rating there (nor does anything
        # anchored on it)
        played = (boot_wins + boot_wins.transpose(0, 2, 1)).sum(2) > 0
        a = index[anchor]
        elo = np.where(played & played[:, a:a + 1], 1000 + ELO * (boot - boot[:, a:a + 1]), np.nan)
        for m, i in index.items():
            rating = 1000 + ELO * (theta[i] - theta[a])
            column = elo[:, i][~np.isnan(elo[:, i])]
            low, high = (np.percentile(column, [2.5, 97.5]) if column.size else (None, None))
            # never lost to (or never beat) the anchor's group: no finite MLE, the prior sets it
            ratings[m] = (rating, low, high, not (reach[a, i] and reach[i, a]))

    style = _style_control(texted, anchor, rounds, seed, ridge)
    for m in listed:
        rating, low, high, unbounded = ratings[m]
        c = style["models"].get(m) or {}
        result["models"][m] = {"rating": _round(rating, 2), "rating_ci_low": _round(low, 2),
                               "rating_ci_high": _round(high, 2), "unbounded": unbounded,
                               **_record(usable, m),
                               "controlled_rating": c.get("rating"),
                               "controlled_rating_ci_low": c.get("rating_ci_low"),
                               "controlled_rating_ci_high": c.get("rating_ci_high")}
    for i, old in enumerate(listed):
        for new in listed[i + 1:]:
            games = [g for g in usable if {g[0], g[1]} == {old, new}]
            if games:
                result["pairs"][f"{new}_vs_{old}"] = _record(games, new)  # new's record
    result["style_control"] = {"votes": style["battles"],
                               "without_texts": len(decided) - len(texted),
                               "anchor": style["anchor"], "separated": style["separated"],
                               "coefficients": style["coefficients"]}
    return result


def _style_control(texted: list[dict], anchor: str | None, rounds: int, seed: int,
                   ridge: float) -> dict:
    """The style-controlled fit of the decided votes that recorded both answers. Its ratings
    count only when ``anchor`` (the raw table's) is among them: else they are null, not
    silently rated from another anchor."""
    from voicetune.evaluate import style_control  # it builds on this module's fit

    battles = [{"a": v["model_a"], "b": v["model_b"],
                "winner": {"A": "a", "B": "b", "tie": "tie"}[v["vote"]],
                "text_a": v["answer_a"], "text_b": v["answer_b"]} for v in texted]
    fitted = style_control.controlled(battles, anchor=anchor, rounds=rounds, seed=seed,
                                      ridge=ridge)
    if fitted["anchor"] != anchor:
        fitted = {**fitted, "anchor": None, "models": {}}
    return fitted


# ------------------------------------------------------------------------------ showing it
def summary_note(result: dict, unbounded: bool = True) -> str:
    """One line: what was counted and how, for the page and the report."""
    parts = [f"{result['used']} vote(s) counted"]
    if result["other_weights"]:
        parts.append(f"{result['other_weights']} for other weights (adapters, base or fused "
                     "model) not counted")
    if result["invalid"]:
        parts.append(f"{result['invalid']} naming unknown models not counted")
    if result["both_bad"]:
        parts.append(f"{result['both_bad']} both bad (kept out of ratings and win rates)")
    if result["anchor"]:
        parts.append(f"Bradley–Terry ratings on the Elo scale, {result['anchor']} = 1000, 95% "
                     f"bootstrap intervals ({result['rounds']} resamples, seed {result['seed']})")
    if unbounded and result["separated"]:
        parts.append(unbounded_note(result))
    if result["anchor"] and result.get("style_control"):  # absent from an older arena.json
        parts.append(style_note(result))
    return "; ".join(parts)


def style_note(result: dict) -> str:
    """What the style-controlled column counted, in words."""
    style = result["style_control"]
    note = (f"style-controlled: the same fit with length and markdown differences as covariates, "
            f"read at zero, over {style['votes']} vote(s) that recorded both answers")
    if style["without_texts"]:
        note += f" ({style['without_texts']} older vote(s) without them left out)"
    if style["anchor"] is None and style["votes"]:
        note += f" (none of them with {result['anchor']}: no style-controlled ratings)"
    length = style["coefficients"]["length"]
    if length is not None:
        note += (f", length coefficient {length['coefficient']:+.2f} logits (95% CI "
                 f"{length['ci_low']:+.2f} … {length['ci_high']:+.2f})")
    if style["separated"]:
        note += (", which no finite fit explains (style alone or a model's record decides the "
                 "votes): a weak prior holds it finite")
    return note


def unbounded_note(result: dict) -> str:
    """Which ratings the data leave unbounded, in words."""
    words = []
    for name, m in result["models"].items():
        if m["unbounded"]:
            verb = "never lost to" if m["rating"] > 1000 else "never beat"
            words.append(f"{name} {verb} {result['anchor']}'s side")
    return (" and ".join(words) + ": no finite rating fits that, the one shown is held finite "
            "by a weak prior (it gives the direction, not the size)")


def voice_models(path: str | Path = VOICE) -> dict[str, dict] | None:
    """The voice score of each model (metrics/voice.json's "models": at least "score" and
    "gap_closed", a number or {"value", "ci95_low", "ci95_high"}), or None when the file does
    not exist yet, or when it says the score is uninformative on this data (no result to show
    beside the ratings; the report says why)."""
    path = Path(path)
    if not path.exists():
        return None
    voice = json.loads(path.read_text())
    return voice.get("models") if voice.get("informative", True) else None


def _gap_closed(v: dict) -> tuple[float | None, float | None, float | None]:
    """(value, 95% low, 95% high) of a model's gap closed: a number, or voice.json's
    {"value", "ci95_low", "ci95_high"}."""
    gap = v.get("gap_closed")
    if isinstance(gap, dict):
        return gap.get("value"), gap.get("ci95_low"), gap.get("ci95_high")
    return gap, None, None


def _voice_text(voice: dict | None, model: str) -> str:
    v = (voice or {}).get(model)
    if not v or v.get("score") is None:
        return "—"
    gap, low, high = _gap_closed(v)
    if gap is None:
        return f"{v['score']:.2f}"
    ci = "" if low is None else f", 95% CI {low:.0%} … {high:.0%}"
    return f"{v['score']:.2f} ({gap:.0%} of the gap{ci})"


def table_rows(result: dict, voice: dict[str, dict] | None = None) -> dict:
    """The page's table: one row per model, and a note. ``voice``: model -> {"score",
    "gap_closed"} (``voice_models``); when given, each row gains them (None when missing)."""
    rows = []
    for name, m in result["models"].items():
        ci = [m["rating_ci_low"], m["rating_ci_high"]] if m["rating_ci_low"] is not None else None
        controlled_ci = ([m["controlled_rating_ci_low"], m["controlled_rating_ci_high"]]
                         if m.get("controlled_rating_ci_low") is not None else None)
        row = {"model": name, "rating": m["rating"], "rating_ci": ci,
               "controlled_rating": m.get("controlled_rating"),
               "controlled_rating_ci": controlled_ci,
               "unbounded": m["unbounded"],
               **{k: m[k] for k in ("battles", "wins", "ties", "losses", "both_bad",
                                    "win_rate")},
               "win_rate_ci": [m["win_rate_ci_low"], m["win_rate_ci_high"]]
               if m["win_rate"] is not None else None}
        if voice is not None:
            v = voice.get(name) or {}
            gap, low, high = _gap_closed(v)
            row |= {"voice_score": v.get("score"), "voice_gap_closed": gap,
                    "voice_gap_closed_ci": None if low is None else [low, high]}
        rows.append(row)
    return {"rows": rows, "note": summary_note(result)}


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def markdown(result: dict, plot: str | None = None,
             voice: dict[str, dict] | None = None) -> list[str]:
    """The ratings as markdown lines (the report's arena section): each rating without and
    with style control; ``voice`` (``voice_models``) adds each model's voice score."""
    voice_head, voice_rule = ((" voice score (share of the base→author gap closed) |", "---|")
                              if voice is not None else ("", ""))
    lines = [summary_note(result, unbounded=False) + ".", "",
             "| model | rating | 95% CI | style-controlled | 95% CI | battles "
             "| wins / ties / losses | both bad | win rate | 95% CI |" + voice_head,
             "|---|---|---|---|---|---|---|---|---|---|" + voice_rule]
    for name, m in result["models"].items():
        m = {"controlled_rating": None, "controlled_rating_ci_low": None,
             "controlled_rating_ci_high": None, **m}  # an older arena.json has none
        lines.append(
            f"| {name} | {_num(m['rating'], '.0f')}{' *' if m['unbounded'] else ''} | "
            f"{_num(m['rating_ci_low'], '.0f')} … "
            f"{_num(m['rating_ci_high'], '.0f')} | {_num(m['controlled_rating'], '.0f')} | "
            f"{_num(m['controlled_rating_ci_low'], '.0f')} … "
            f"{_num(m['controlled_rating_ci_high'], '.0f')} | {m['battles']} | "
            f"{m['wins']} / {m['ties']} / "
            f"{m['losses']} | {m['both_bad']} | {_num(m['win_rate'], '.1%')} | "
            f"{_num(m['win_rate_ci_low'], '.1%')} … {_num(m['win_rate_ci_high'], '.1%')} |"
            + (f" {_voice_text(voice, name)} |" if voice is not None else ""))
    if result["separated"]:
        lines += ["", "\\* " + unbounded_note(result) + "."]
    if plot:
        lines += ["", f"![arena ratings]({plot})"]
    return lines


def plot_png(result: dict) -> bytes:
    """The ratings with their 95% intervals as PNG bytes (stable: no version stamp). Uses the
    object API, not pyplot: no global backend switch, safe in the page's server threads."""
    import io

    from matplotlib.figure import Figure

    rated = [(n, m) for n, m in result["models"].items() if m["rating"] is not None]
    fig = Figure(figsize=(7, 1.2 + 0.6 * max(len(rated), 2)))
    ax = fig.add_subplot()
    if not rated:
        message = ("no votes yet: run make arena" if not result["votes"] else
                   "no decided votes for these models yet" +
                   (f"\n({result['other_weights']} for other weights)"
                    if result["other_weights"] else ""))
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13)
        ax.set_axis_off()
    else:
        names = [n for n, _ in rated][::-1]
        values = np.array([m["rating"] for _, m in rated][::-1])
        low = np.array([m["rating_ci_low"] for _, m in rated][::-1])
        high = np.array([m["rating_ci_high"] for _, m in rated][::-1])
        y = np.arange(len(names))
        ax.errorbar(values, y, xerr=[values - low, high - values], fmt="o", capsize=5)
        for row, (_, m) in enumerate(rated[::-1]):
            if m["unbounded"]:
                ax.annotate("never lost: no upper limit" if m["rating"] > 1000 else
                            "never won: no lower limit", (m["rating"], row),
                            xytext=(0, 9), textcoords="offset points", ha="center", fontsize=9)
        ax.axvline(1000, color="grey", lw=0.8, ls="--")
        ax.set_yticks(y, [f"{n}\n({m['battles']} battles)" for n, m in rated][::-1])
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set(xlabel=f"Bradley–Terry rating, Elo scale ({result['anchor']} = 1000)",
               title=f"Arena ratings, 95% bootstrap intervals "
                     f"({result['used'] - result['both_bad']} decided votes)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()
