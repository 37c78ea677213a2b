"""Posts in, grounded question/answer pairs out: the ingest stage's library.

For each passage of the author's posts a generator writes ``ingest.questions`` questions a
reader would ask (one call per passage, a numbered list), then one answer per question in the
author's first-person voice, given the passage and the persona (``data.system_prompt``). Small
models do not follow "reply as JSON"; a numbered list of lines ending in "?" they do.

The generator is the pipeline's own base model in-process or any OpenAI-compatible chat
endpoint (``voicetune.models.generators``, shared with the judge).

Every pair is validated; a rejected one is counted under its reason (``REASONS``). The raw
replies are cached per passage under ``cache/ingest/`` (outside DVC's outputs), keyed by a
hash of what the generator saw and how it was asked: adding a post generates only its
passages, a killed run resumes, and changing a validation threshold regenerates nothing.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Iterable

from voicetune.data.qa import normalized
from voicetune.data.text import MARKUP, content_words, copied_share
from voicetune.core.files import write_json_atomic
from voicetune.models.generators import GeneratorError, Reply, cache_digest, read_record

# Bump when a prompt's wording changes: it is part of every cache key and every pair's provenance.
PROMPT_VERSION = "ingest-v1"

# Why a candidate question or pair was dropped (metrics/ingest.json counts each):
REASONS = {
    "unparseable": "the question reply held no numbered question at all",
    "not_a_question": "a listed line that does not end in '?' or has under 3 words",
    "duplicate": "the same question (normalized) as an earlier one in the corpus",
    "cut": "the answer hit ingest.max_tokens mid-sentence, and no whole sentence of it is "
           "long enough to keep (ingest.trim_cut: its whole sentences are kept when they are)",
    "markup": "the reply holds a chat-template token such as <|im_end|> or a <placeholder>",
    "too_short": "answer under ingest.min_answer_words words",
    "too_long": "answer over ingest.max_answer_words words",
    "ungrounded": "under ingest.min_grounding of the answer's content words are in the passage",
    "copied": "over ingest.max_copied of the answer is verbatim runs of the passage",
    "not_first_person": "the answer never speaks as the author (no I, me, my, we, our)",
}
# the generator's errors (an endpoint that fails, a missing model), by the name ingest's callers know
IngestError = GeneratorError



# ------------------------------------------------------------------------------ prompts
def question_chat(title: str | None, heading: str | None, text: str, n: int) -> list[dict]:
    where = " ".join(f'"{t}"' for t in (title, heading) if t)
    items = "\n".join(f"{i}. <question>" for i in range(1, n + 1))
    return [{"role": "user", "content": (
        f"Read this passage from a blog post{' ' + where if where else ''}:\n\n{text}\n\n"
        f"Write {n} different questions a reader could ask the author about it. "
        f"Use this format:\n{items}")}]


def answer_chat(persona: str, text: str, question: str) -> list[dict]:
    return [{"role": "system", "content": f"{persona}\n\nYou wrote this on your blog:\n\n{text}"},
            {"role": "user", "content": (
                f"{question}\n\nAnswer as the author, in the first person (I, my), in 2 to 4 "
                "sentences, using what you wrote.")}]


# ------------------------------------------------------------------------------ parsing
_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•]|Q\d*[.:])\s*(.*)$")



def parse_questions(text: str, n: int) -> tuple[list[str], dict[str, int]]:
    """The questions among a numbered-list reply's first ``n`` items and the rejections:
    an item that is no question is ``not_a_question``; a reply with no item ``unparseable``.
    Unnumbered lines ("Here are three questions:") are preamble, not rejections."""
    questions, rejected = [], {}
    items = [m.group(1).strip().strip('*"“” ').strip() for line in text.splitlines()
             if (m := _ITEM.match(line))]
    if not items:  # a model that skipped the numbers: each line that asks something
        items = [line.strip() for line in text.splitlines() if line.strip().endswith("?")]
    for item in items[:n]:  # the first n items answer the request; more are ignored
        if MARKUP.search(item):
            reason = "markup"
        elif not item.endswith("?") or len(item.split()) < 3:
            reason = "not_a_question"
        else:
            questions.append(item)
            continue
        rejected[reason] = rejected.get(reason, 0) + 1
    if not questions and not rejected:
        rejected["unparseable"] = 1
    return questions, rejected


def grounding(answer: str, passage: str) -> float:
    """The share of the answer's content words that the passage has too."""
    mine = content_words(answer)
    return len(mine & content_words(passage)) / len(mine) if mine else 0.0


# A sentence ends at . ! or ? (closing quotes and brackets allowed) before a space or the end.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
_FIRST_PERSON = re.compile(r"\b(i|i'm|i've|i'd|i'll|me|my|mine|myself|we|we're|we've|us|our|ours)\b",
                           re.IGNORECASE)


def whole_sentences(text: str) -> str:
    """``text`` up to the end of its last complete sentence ("" if it has none)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].strip() if ends else ""


def check_answer(reply: Reply, passage: str, p: dict) -> tuple[str | None, str]:
    """(the reason this answer is rejected, a key of REASONS, or None to keep it; the answer
    as kept). An answer cut at max_tokens keeps its whole sentences when ``trim_cut`` is on
    (small models ramble past the 2-4 sentences asked for) and they pass every other check."""
    text = reply.text.strip()
    if reply.finish_reason == "length":
        text = whole_sentences(text) if p["trim_cut"] else ""
        if len(text.split()) < p["min_answer_words"]:
            return "cut", text
    if MARKUP.search(text):
        return "markup", text
    words = len(text.split())
    if words < p["min_answer_words"]:
        return "too_short", text
    if words > p["max_answer_words"]:
        return "too_long", text
    if copied_share(text, passage) > p["max_copied"]:
        return "copied", text
    if grounding(text, passage) < p["min_grounding"]:
        return "ungrounded", text
    if not _FIRST_PERSON.search(text):
        return "not_first_person", text
    return None, text


# ------------------------------------------------------------------------------ the cache
GENERATION_KEYS = ("questions", "max_tokens", "temperature", "seed", "repetition_penalty")


def limited(posts: list, passages: list, limit: int | None) -> tuple[list, list]:
    """The first ``limit`` passages (ingest.limit; None: all) and the posts they come from."""
    passages = passages[:limit]
    ids = {x.post_id for x in passages}
    return [post for post in posts if post.id in ids], passages


def cache_key(passage, title: str | None, persona: str, generator_identity: str, p: dict) -> str:
    """Everything the generated text depends on: the passage (its sha256 and what the question
    prompt shows), the persona, the generator, the prompt version and the generation params."""
    what = {"passage": passage.sha256, "question_chat": question_chat(title, passage.heading,
                                                                      passage.text, p["questions"]),
            "persona": persona, "generator": generator_identity, "prompt_version": PROMPT_VERSION,
            **{k: p[k] for k in GENERATION_KEYS}}
    return cache_digest(what)


# ------------------------------------------------------------------------------ the run
def generate(passages: list, titles: dict[str, str | None], persona: str, generator, p: dict,
             cache_dir: str | Path, progress: Callable[[int], None] | None = None
             ) -> tuple[list[dict], list[int]]:
    """The raw replies for every passage, in order: ``{"questions_reply", "answers"}``, from the
    cache or generated ``p["batch_size"]`` passages at a time, each written to the cache as soon
    as its batch completes. Returns them and the indices of the passages generated (not cached).

    ``progress(n)`` counts replies, ``1 + p["questions"]`` per passage (its questions, then an
    answer each), as they are generated: a batch of passages takes minutes on a CPU. Answers
    not needed (a question that did not parse) are counted when their batch ends."""
    cache_dir = Path(cache_dir)
    records: list[dict | None] = [None] * len(passages)
    todo = []
    for i, passage in enumerate(passages):
        key = cache_key(passage, titles.get(passage.post_id), persona, generator.identity, p)
        records[i] = read_record(cache_dir / f"{key}.json", PROMPT_VERSION)
        if records[i] is None:
            todo.append((i, key))
    per_passage = 1 + p["questions"]
    hits = len(passages) - len(todo)
    if progress and hits:
        progress(hits * per_passage)
    for start in range(0, len(todo), p["batch_size"]):
        batch = todo[start:start + p["batch_size"]]
        qreplies = generator.complete([question_chat(titles.get(passages[i].post_id), passages[i].heading,
                                                     passages[i].text, p["questions"]) for i, _ in batch],
                                      progress)
        asked = [(i, q) for (i, _), r in zip(batch, qreplies)
                 for q in unique(parse_questions(r.text, p["questions"])[0])]
        areplies = generator.complete([answer_chat(persona, passages[i].text, q) for i, q in asked],
                                      progress)
        for (i, key), qr in zip(batch, qreplies):
            answers = [{"question": q, "text": a.text, "finish_reason": a.finish_reason}
                       for (j, q), a in zip(asked, areplies) if j == i]
            records[i] = {"prompt_version": PROMPT_VERSION, "generator": generator.name,
                          "post_id": passages[i].post_id, "passage_id": passages[i].id,
                          "questions_reply": {"text": qr.text, "finish_reason": qr.finish_reason},
                          "answers": answers}
            write_json_atomic(cache_dir / f"{key}.json", records[i])  # a killed run resumes here
        if progress:  # the answers that were never asked for
            progress(len(batch) * p["questions"] - len(asked))
    return records, [i for i, _ in todo]


def unique(questions: Iterable[str]) -> list[str]:
    """The questions with repeats (``normalized``) dropped, first kept."""
    seen, out = set(), []
    for q in questions:
        if normalized(q) not in seen:
            seen.add(normalized(q))
            out.append(q)
    return out


def validate(passages: list, records: list[dict], p: dict) -> tuple[list[dict], dict[str, int], dict]:
    """Pairs from the raw replies, in passage order, with provenance; the rejections by reason
    (every reason present, 0 if none); counts of questions asked and parsed and answers made."""
    rejected = dict.fromkeys(REASONS, 0)
    seen: set[str] = set()
    rows = []
    counts = {"questions_parsed": 0, "answers_generated": 0, "answers_trimmed": 0}
    for passage, record in zip(passages, records):
        questions, bad = parse_questions(record["questions_reply"]["text"], p["questions"])
        for reason, n in bad.items():
            rejected[reason] += n
        counts["questions_parsed"] += len(questions)
        answers = {a["question"]: a for a in record["answers"]}
        for q in questions:
            key = normalized(q)
            if key in seen:  # across the corpus, and within the passage's own list
                rejected["duplicate"] += 1
                continue
            seen.add(key)
            a = answers.get(q)
            if a is None:  # a cache record without it: cannot happen unless edited by hand
                rejected["unparseable"] += 1
                continue
            counts["answers_generated"] += 1
            reason, answer = check_answer(Reply(a["text"], a["finish_reason"]), passage.text, p)
            if reason:
                rejected[reason] += 1
                continue
            counts["answers_trimmed"] += a["finish_reason"] == "length"
            rows.append({"conversation": [{"role": "user", "content": q},
                                          {"role": "assistant", "content": answer}],
                         "post_id": passage.post_id, "passage_id": passage.id,
                         "generator": record["generator"], "prompt_version": record["prompt_version"]})
    return rows, rejected, counts


def run(posts: list, passages: list, persona: str, generator, p: dict, cache_dir: str | Path,
        progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """(pairs, metrics) for the passages of ``posts``."""
    start = time.perf_counter()
    titles = {post.id: post.title for post in posts}
    records, fresh = generate(passages, titles, persona, generator, p, cache_dir, progress)
    seconds = time.perf_counter() - start
    rows, rejected, counts = validate(passages, records, p)
    new = {(passages[i].post_id, passages[i].id) for i in fresh}
    new_pairs = sum((r["post_id"], r["passage_id"]) in new for r in rows)
    metrics = {
        "generator": generator.name, "prompt_version": PROMPT_VERSION,
        "posts": len(posts), "passages": len(passages),
        "cache_hits": len(passages) - len(fresh), "passages_generated": len(fresh),
        "questions_asked": len(passages) * p["questions"], **counts,
        "pairs": len(rows), "rejected": rejected,
        "generation_seconds": round(seconds, 1),
        # this run's own speed: pairs kept from the passages it generated (cache hits aside)
        "pairs_per_minute": round(new_pairs / seconds * 60, 2) if fresh and seconds > 0 else None,
    }
    return rows, metrics
