"""Preference pairs for DPO/ORPO: what the author wrote against what the fine-tuned model says.

Self-play (SPIN, Chen et al. 2024): for a training question, ``chosen`` is the author's answer
and ``rejected`` is the SFT LoRA's own greedy answer, decoded exactly as the evaluate stage
decodes it, so a rejected answer is the model's prediction for that question. Only the train
split is used: a valid or test question here would be trained on, then scored.

Arena votes add their pairs (``voicetune.data.vote_pairs.pairs_from_votes``), but only votes
for the current base and SFT adapters (``votes.weights_match``: a battle with the fused or dpo
model is left out, this stage depends on neither), never a question drawn from the test split, and never a question that
is (``normalized``) a valid- or test-split question. Votes whose two answers are the same text,
ties and "both bad" give no pair there.

A pair whose two answers are identical or nearly so (difflib ratio >= max_similarity) teaches
nothing and is dropped; every drop and exclusion is counted. The validation slice is drawn by
question: a self-play pair and an arena pair on one question are never split between train and
valid, where they would flatter the preference stage's early stopping. Each pair is one line of
mlx-lm-lora's DPO format ``{"prompt", "chosen", "rejected", "system"}`` plus ``source`` and
``question_index``, which its loader ignores.
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Callable

from voicetune.data.qa import seeded_order, normalized
from voicetune.core.errors import UserError
from voicetune.core.jsonl import JsonlError, read_jsonl
from voicetune.models.fusion import load_float32
from voicetune.models.generation import generate_batched, prompt_tokens
from voicetune.data.vote_pairs import pairs_from_votes
from voicetune.data.votes import weights_identity, weights_match


class PairsError(UserError, ValueError):
    pass


def _exchange_problem(row: dict) -> str | None:
    """Why ``row`` is not one exchange of the prepare stage (None: it is)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        return 'not a {"messages": [...]} row of the prepare stage; rerun it (dvc repro prepare)'
    roles = [m["role"] for m in messages]
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]) or \
            not all(isinstance(m["content"], str) for m in messages):
        return (f"roles {roles}; the pairs stage takes one exchange per row ([system,] user, "
                "assistant), as the prepare stage writes them")
    return None


def read_exchanges(path: str | Path) -> list[dict]:
    """``{"messages", "system", "question", "answer"}`` per row of a prepared split. A row must
    be one exchange ([system,] user, assistant), as prepare writes them: the pair format has no
    place for earlier turns, and dropping them would change what the answer replies to."""
    try:
        rows = read_jsonl(path, _exchange_problem, missing="run the prepare stage first (dvc repro prepare)")
    except JsonlError as err:
        raise PairsError(str(err)) from None  # the stage's own error type, all problems kept
    out = []
    for row in rows:
        messages = row["messages"]
        texts = [m["content"] for m in messages]
        out.append({"messages": messages, "system": texts[0] if messages[0]["role"] == "system" else None,
                    "question": texts[-2], "answer": texts[-1]})
    return out


def read_votes_used(path: str | Path) -> list[dict]:
    """The arena votes the pairs_votes stage passed on (``{"votes_file", "votes"}``), for a
    run with arena among preference.sources."""
    path = Path(path)
    try:
        used = json.loads(path.read_text(encoding="utf-8"))
        votes, source = used["votes"], used["votes_file"]
    except FileNotFoundError:
        raise PairsError(f"{path}: not found; run the pairs_votes stage first "
                         "(dvc repro pairs_votes)") from None
    except (ValueError, KeyError, TypeError):
        votes = source = None
    if not isinstance(votes, list) or not all(isinstance(v, dict) for v in votes):
        raise PairsError(f"{path}: not the pairs_votes stage's output ({{\"votes_file\", "
                         "\"votes\"}); rerun it (dvc repro pairs_votes)")
    if source is None:
        raise PairsError(f"{path} was written without arena among preference.sources, so it "
                         "holds no vote; rerun it (dvc repro pairs_votes)")
    return votes


def current_weights(votes: list[dict], root: str | Path = ".") -> tuple[dict, str | None]:
    """The identity (md5s in ``root``'s dvc.lock) of the weights this stage answers with, base
    and SFT adapters, that an arena vote must match; and a warning when votes were passed on
    but no trained adapters are recorded, so that none can be used."""
    # dvc.lock is no dep: models/base and models/adapters are, and their entries change
    # exactly with them (fused and preference adapters are no deps: never counted here)
    identity = {w: md5 for w, md5 in weights_identity(root).items() if w in ("base", "adapters")}
    if identity.get("adapters") is None and votes:
        return identity, ("dvc.lock records no trained models/adapters: no arena vote can be "
                          "matched to the current adapter, none is used")
    return identity, None


def model_loader(model: str | Path, adapters: str | Path) -> Callable[[], tuple]:
    """``build``'s ``load_model``: the base model under the SFT adapters, in float32 as the
    evaluate stage decodes them; a missing folder says which stage makes it."""
    def load():
        for path in (model, adapters):
            if not Path(path).is_dir():
                raise PairsError(f"{path}: not found; run the pipeline up to the train "
                                 "stage first (dvc repro train)")
        loaded, tokenizer, _ = load_float32(model, adapters)
        return loaded, tokenizer
    return load


def sample(n: int, k: int | None, seed: int) -> list[int]:
    """The indices of ``k`` of ``n`` questions (all when ``k`` is None or >= n), in file order.
    The first ``k`` of one seeded order: a larger ``k`` keeps every question a smaller one drew."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(seeded_order(n, seed)[:k])


def self_pairs(model, tokenizer, rows: list[dict], indices: list[int], max_tokens: int,
               batch_size: int, repetition_penalty: float | None,
               progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[dict]]:
    """The author's answer vs the model's greedy answer for each row in ``indices``; returns the
    pairs and the generated answers (tokens, finish reason)."""
    prompts = [prompt_tokens(tokenizer, rows[i]["messages"]) for i in indices]
    answers = generate_batched(model, tokenizer, prompts, max_tokens, 0.0, 0, batch_size,
                               repetition_penalty, progress=progress)
    pairs = [pair(rows[i]["question"], rows[i]["answer"], a["prediction"], rows[i]["system"], "self", i)
             for i, a in zip(indices, answers)]
    return pairs, answers


def pair(prompt: str, chosen: str, rejected: str, system: str | None, source: str,
         index: int | None) -> dict:
    """One line of the output; no ``system`` key without a persona (the loader would put a
    null system message into the chat)."""
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if system is not None:
        out["system"] = system
    return {**out, "source": source, "question_index": index}


def arena_pairs(votes: list[dict], identity: dict, heldout_questions: set[str]
                ) -> tuple[list[dict], dict]:
    """Pairs from the decisive votes for the weights ``identity`` names (votes.weights_match)
    whose question may be trained on, and the count of decisive votes left out for each reason
    (a vote counts under its first reason)."""
    counts = {"arena_other_weights": 0, "arena_test_excluded": 0,
              "arena_heldout_question_excluded": 0}
    pairs = []
    for vote in votes:
        found = pairs_from_votes([vote])
        if not found:
            continue  # a tie, both bad, or no usable pair
        if not weights_match(vote, identity):
            counts["arena_other_weights"] += 1
        elif vote.get("from_test") is not False:  # a vote that does not say is not trusted
            counts["arena_test_excluded"] += 1
        elif normalized(found[0]["prompt"]) in heldout_questions:
            counts["arena_heldout_question_excluded"] += 1
        else:
            p = found[0]
            pairs.append(pair(p["prompt"], p["chosen"], p["rejected"], p.get("system"), "arena", None))
    return pairs, counts


def similarity(a: str, b: str) -> float:
    """difflib's ratio over characters. autojunk off: on texts of 200+ characters it would
    treat every common letter as junk and call two near-copies different."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def drop_alike(pairs: list[dict], max_similarity: float) -> tuple[list[dict], dict]:
    """The pairs whose answers differ enough, and how many were dropped as identical (equal
    after stripping whitespace) or as similar (ratio >= ``max_similarity``)."""
    kept, counts = [], {"dropped_identical": 0, "dropped_similar": 0}
    for p in pairs:
        if p["chosen"].strip() == p["rejected"].strip():
            counts["dropped_identical"] += 1
        elif similarity(p["chosen"], p["rejected"]) >= max_similarity:
            counts["dropped_similar"] += 1
        else:
            kept.append(p)
    return kept, counts


def prompts(pairs: list[dict]) -> list[str]:
    """The distinct prompts of ``pairs`` (``normalized``), in order of first appearance."""
    return list(dict.fromkeys(normalized(p["prompt"]) for p in pairs))


def split(pairs: list[dict], valid_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded held-out slice for validation, by prompt: every pair of one question (a
    self-play pair and arena votes on it) lies on one side, or validation would score answers
    to a question trained on. floor(valid_ratio * prompts) prompts, as prepare sizes its
    splits, at least one on each side; both sides in their original order. Fewer than 2
    prompts is refused by the caller."""
    keys = prompts(pairs)
    n_valid = min(max(1, math.floor(valid_ratio * len(keys))), len(keys) - 1)
    valid = {keys[i] for i in seeded_order(len(keys), seed)[:n_valid]}
    return ([p for p in pairs if normalized(p["prompt"]) not in valid],
            [p for p in pairs if normalized(p["prompt"]) in valid])


def mean_chars(texts: list[str]) -> float | None:
    return round(sum(map(len, texts)) / len(texts), 1) if texts else None


def too_few(n: int, metrics: dict, n_prompts: int | None = None) -> PairsError:
    dropped = metrics["dropped_identical"] + metrics["dropped_similar"]
    # the split is by question: two pairs on one question cannot be both trained and validated on
    one_question = ", all on one question" if n >= 2 and n_prompts == 1 else ""
    return PairsError(
        f"{n} preference pair{'s' * (n != 1)}{one_question} after dropping {metrics['dropped_cut']} cut at "
        f"preference.max_tokens and {dropped} whose answers are alike "
        f"(from {metrics['candidates']} candidates; {metrics['generated']} self-play answers, "
        f"{metrics['arena_candidates']} arena votes); at least 2 questions are needed, one to "
        "train on and one to validate. Raise preference.pairs (null: every training question), "
        "preference.max_tokens or preference.max_similarity, add arena votes (make arena), or "
        "list both sources in preference.sources")


def summary(metrics: dict) -> str:
    return (f"{metrics['train_pairs']} train + {metrics['valid_pairs']} valid pairs ({metrics['self_pairs']} self, "
            f"{metrics['arena_pairs']} arena) from {metrics['candidates']} candidates; dropped "
            f"{metrics['dropped_cut']} rejected answers cut at {metrics['max_tokens']} tokens, "
            f"{metrics['dropped_identical']} identical, {metrics['dropped_similar']} similar; "
            f"arena votes left out: "
            f"{metrics['arena_other_weights']} other weights, {metrics['arena_test_excluded']} "
            f"test questions, {metrics['arena_heldout_question_excluded']} held-out questions")


def build(p: dict, eval_p: dict, rows: list[dict], heldout_questions: set[str],
          votes: list[dict], identity: dict, load_model: Callable[[], tuple],
          progress: Callable[[int], None] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, valid pairs, metrics) from the training rows and the votes, for the
    ``preference`` params ``p`` and ``eval`` params ``eval_p``. The model is loaded (by
    ``load_model``) only when self-play is among the sources."""
    self_candidates, answers = [], []
    if "self" in p["sources"]:
        model, tokenizer = load_model()
        self_candidates, answers = self_pairs(model, tokenizer, rows, sample(len(rows), p["pairs"], p["seed"]),
                                              p["max_tokens"], eval_p["batch_size"],
                                              eval_p.get("repetition_penalty"), progress)
    # an answer cut at max_tokens ends mid-sentence, yet the chat template would close it with
    # the end-of-turn token: DPO could learn "answers that stop early are bad" from that artifact
    # instead of anything about the voice, so such pairs are dropped (and counted)
    cut = sum(a["finish_reason"] == "length" for a in answers) if p["drop_cut_answers"] else 0
    if p["drop_cut_answers"]:
        self_candidates = [q for q, a in zip(self_candidates, answers) if a["finish_reason"] != "length"]
    arena_candidates, arena_counts = arena_pairs(votes if "arena" in p["sources"] else [], identity,
                                                 heldout_questions)
    kept, dropped = drop_alike(self_candidates + arena_candidates, p["max_similarity"])
    metrics = {
        "candidates": len(answers) + len(arena_candidates),
        "generated": len(answers), "arena_candidates": len(arena_candidates),
        "dropped_cut": cut, **dropped,
        # *_pairs, not train/arena: a metric named like a params section collides in exp_show
        "self_pairs": sum(q["source"] == "self" for q in kept),
        "arena_pairs": sum(q["source"] == "arena" for q in kept), **arena_counts,
    }
    if len(prompts(kept)) < 2:
        raise too_few(len(kept), metrics, len(prompts(kept)))
    train, valid = split(kept, p["valid_ratio"], p["seed"])
    metrics.update({
        "train_pairs": len(train), "valid_pairs": len(valid), "max_tokens": p["max_tokens"],
        "hit_token_limit": sum(a["finish_reason"] == "length" for a in answers),
        "chosen_chars": mean_chars([q["chosen"] for q in kept]),
        "rejected_chars": mean_chars([q["rejected"] for q in kept]),
    })
    return train, valid, metrics


def heldout(paths) -> set[str]:
    """The ``normalized`` questions of the valid and test splits."""
    return {normalized(row["question"]) for path in paths for row in read_exchanges(path)}
