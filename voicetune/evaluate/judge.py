"""The pairwise judge: "which of these two answers did the author write?", asked in both orders.

The judge sees the persona-free task: the reader's question, a few of the author's own train
answers as examples of their writing (``eval.judge.examples``, a seeded choice), and two
answers labelled A and B; it replies with one letter. Small models do not follow "reply as
JSON"; the first standalone A or B of the reply is its choice, and any other reply is
unparseable (counted).

Every pair is asked in both orders (MT-Bench, Arena-Hard): a verdict counts only when the two
orders agree, the same answer chosen once as A and once as B; a disagreement (or an
unparseable reply) is a tie, since a judge that answers by position would otherwise decide
every pair. Two identical answers are a tie without a call.

Contests: every evaluated model against base, and every model (base too) against the author's
own answer ("author": how often the judge was fooled is the share of those the model won).
Each reports the raw win rate (ties half) with a 95% Wilson interval, wins/ties/losses, the
position bias (the share of parsed replies that picked the first answer; 0.5 is none), the
consistency (the share of pairs asked whose two orders agreed), and the unparseable replies;
and all verdicts together are fitted with the length covariate (``style_control.fit``), so the
win rates vs base are also reported length-controlled.

The judge is a generator (``voicetune.models.generators``): the base model in-process, greedy,
or an OpenAI-compatible endpoint; every reply is cached under ``cache/judge/``.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable

from voicetune.core.errors import UserError
from voicetune.core.jsonl import read_jsonl
from voicetune.evaluate.ratings import wilson
from voicetune.models.generators import cached_complete
from voicetune.models.registry import NAMES

# Bump when the prompt's wording changes: it is part of every cache key.
PROMPT_VERSION = "judge-v1"
AUTHOR = "author"  # the author's own answer (the test split's reference), a contestant too
# auto: a judge this small picks by position, not by voice (see why_off)
TOO_SMALL = "embedded:smollm2-135m"
_LETTER = re.compile(r"\b([AB])\b")  # upper case only: "a" is an article


class JudgeError(UserError, ValueError):
    pass


def why_off(p: dict, model_source: str) -> str | None:
    """Why the judge does not run under the params ``p`` (eval.judge), or None: it runs."""
    if p["run"] == "off":
        return "eval.judge.run is off"
    if p["run"] == "auto" and not p["endpoint"] and model_source.startswith(TOO_SMALL):
        # measured with eval.judge.run: on, limit: 6 on the sample data (84 replies)
        return ("eval.judge.run is auto and the judge would be the embedded 135M model "
                f"({model_source}), which answers by position, not by voice: on 6 test "
                "questions it chose answer A in 84 of 84 replies (position bias 1.00), so every "
                "pair was a tie; set eval.judge.endpoint to a stronger model's server, or "
                "eval.judge.run: on")
    return None


# ------------------------------------------------------------------------------ inputs
def read_answers(eval_dir: str | Path, limit: int | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """The questions and every contestant's answers to them: each model with predictions in
    ``eval_dir`` (<name>.jsonl; base is required) and the author (base's references)."""
    eval_dir = Path(eval_dir)
    found = {name: read_jsonl(eval_dir / f"{name}.jsonl", missing="run `dvc repro evaluate@base` first"
                              if name == "base" else None)
             for name in NAMES if name == "base" or (eval_dir / f"{name}.jsonl").is_file()}
    base = found["base"][:limit]
    questions = [row["question"] for row in base]
    for name, rows in found.items():
        rows = rows[:limit]
        asked = [row["question"] for row in rows]
        if asked != questions:
            where = next((i for i, (a, b) in enumerate(zip(asked, questions)) if a != b),
                         min(len(asked), len(questions)))
            raise JudgeError(f"{eval_dir / name}.jsonl: question {where + 1} (of {len(rows)}) is not "
                             f"base.jsonl's (of {len(base)}): the predictions are of other test "
                             f"splits; rerun `dvc repro evaluate@{name}`")
    answers = {name: [row["prediction"] for row in rows[:limit]] for name, rows in found.items()}
    answers[AUTHOR] = [row["reference"] for row in base]
    return questions, answers


def example_answers(train_rows: list[dict], n: int, seed: int) -> list[str]:
    """``n`` of the author's train answers (mlx-lm chat rows: the last message), a seeded choice."""
    answers = [row["messages"][-1]["content"] for row in train_rows]
    return random.Random(seed).sample(answers, min(n, len(answers)))


# ------------------------------------------------------------------------------ the question
def judge_chat(question: str, examples: list[str], first: str, second: str) -> list[dict]:
    shown = "".join(f"Example {i}:\n{text}\n\n" for i, text in enumerate(examples, 1))
    intro = f"Here are answers one author wrote to readers' questions.\n\n{shown}" if examples else ""
    return [{"role": "user", "content": (
        f"{intro}A reader asked: {question}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
        "One of these two answers was written by the author. Which one? "
        "Reply with one letter: A or B.")}]


def parse_letter(reply: str) -> str | None:
    """The first standalone A or B of the reply ("B", "Answer A.", "**B**"), or None."""
    m = _LETTER.search(reply)
    return m.group(1) if m else None


def verdict(model_first: str | None, model_second: str | None) -> tuple[str, str]:
    """(winner: "model", "opponent" or "tie"; why: "agree", "disagree" or "unparseable") from
    the letters of the two orders: the model's answer shown as A, then as B."""
    first = {"A": "model", "B": "opponent"}.get(model_first)
    second = {"A": "opponent", "B": "model"}.get(model_second)
    if first is None or second is None:
        return "tie", "unparseable"
    return (first, "agree") if first == second else ("tie", "disagree")


def contests(names: list[str]) -> list[tuple[str, str]]:
    """(model, opponent): every model but base against base, then every model against the author."""
    return [(m, "base") for m in names if m != "base"] + [(m, AUTHOR) for m in names]


# ------------------------------------------------------------------------------ the run
def judge(questions: list[str], answers: dict[str, list[str]], examples: list[str], generator,
          cache_dir: str | Path, progress: Callable[[int], None] | None = None
          ) -> tuple[list[dict], dict]:
    """(one record per contest and question, metrics) for ``answers`` (contestant -> one
    answer per question; base and the author included). ``progress(n)`` counts the replies,
    two per pair (an identical pair's two at once)."""
    pairs = [(model, opponent, i) for model, opponent in contests([n for n in answers if n != AUTHOR])
             for i in range(len(questions))]
    chats = []
    for model, opponent, i in pairs:
        x, y = answers[model][i], answers[opponent][i]
        if not _same(x, y):
            chats += [judge_chat(questions[i], examples, x, y), judge_chat(questions[i], examples, y, x)]
    identical = len(pairs) - len(chats) // 2
    if progress and identical:
        progress(2 * identical)
    replies, asked = cached_complete(generator, chats, cache_dir, PROMPT_VERSION, progress=progress)

    records = []
    texts = iter(r.text for r in replies)
    for model, opponent, i in pairs:
        if _same(answers[model][i], answers[opponent][i]):
            shown, letters, (winner, why) = [], [], ("tie", "identical")
        else:
            shown = [next(texts), next(texts)]
            letters = [parse_letter(t) for t in shown]
            winner, why = verdict(*letters)
        records.append({"contest": f"{model}_vs_{opponent}", "model": model, "opponent": opponent,
                        "index": i, "question": questions[i], "replies": shown, "letters": letters,
                        "verdict": {"model": model, "opponent": opponent}.get(winner, "tie"),
                        "why": why})
    metrics = {
        "generator": generator.name, "prompt_version": PROMPT_VERSION, "questions": len(questions),
        "examples": len(examples), "calls": len(chats), "asked": asked, "cache_hits": len(chats) - asked,
        **_tally(records),
        "contests": {name: _contest(rows) for name, rows in _by_contest(records).items()},
    }
    return records, metrics


def _same(x: str, y: str) -> bool:
    return x.strip() == y.strip()


def _by_contest(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["contest"], []).append(r)
    return out


def _tally(records: list[dict]) -> dict:
    """Position bias, consistency and unparseable replies of ``records``."""
    letters = [x for r in records for x in r["letters"]]
    parsed = [x for x in letters if x]
    asked = [r for r in records if r["why"] != "identical"]
    return {
        "replies": len(letters), "unparseable": len(letters) - len(parsed),
        # the share of parsed replies that chose the first answer shown: 0.5 is no bias
        "position_bias": round(parsed.count("A") / len(parsed), 4) if parsed else None,
        # the share of pairs asked whose two orders agreed on one answer
        "consistency": round(sum(r["why"] == "agree" for r in asked) / len(asked), 4) if asked else None,
    }


def _contest(records: list[dict]) -> dict:
    model, opponent = records[0]["model"], records[0]["opponent"]
    wins = sum(r["verdict"] == model for r in records)
    losses = sum(r["verdict"] == opponent for r in records)
    ties = len(records) - wins - losses
    low, high = wilson(wins + ties / 2, len(records))
    out = {"model": model, "opponent": opponent, "pairs": len(records),
           "wins": wins, "ties": ties, "losses": losses,
           "identical": sum(r["why"] == "identical" for r in records),
           "disagreements": sum(r["why"] == "disagree" for r in records),
           "win_rate": round((wins + ties / 2) / len(records), 4),
           "win_rate_ci_low": round(low, 4), "win_rate_ci_high": round(high, 4),
           **_tally(records)}
    if opponent == AUTHOR:  # the judge took the model's answer for the author's
        out["fooled"] = round(wins / len(records), 4)
    return out


def battles(records: list[dict], answers: dict[str, list[str]]) -> list[dict]:
    """The verdicts as battles of ``style_control.fit``: a is the model, b its opponent."""
    return [{"a": r["model"], "b": r["opponent"],
             "winner": "a" if r["verdict"] == r["model"] else "b" if r["verdict"] == r["opponent"] else "tie",
             "text_a": answers[r["model"]][r["index"]], "text_b": answers[r["opponent"]][r["index"]]}
            for r in records]


def length_controlled(records: list[dict], answers: dict[str, list[str]], rounds: int, seed: int) -> dict:
    """The verdicts fitted with the length covariate: win probabilities vs base, raw and with
    length held equal (``style_control.fit``)."""
    from voicetune.evaluate import style_control

    return style_control.fit(battles(records, answers), anchor="base", rounds=rounds, seed=seed)
