"""Posts in, (plain draft, the author's original) pairs out: the rewrite task's data, by
back-translation.

Style transfer by back-translation (Krishna et al. 2020, "Reformulating Unsupervised Style
Transfer as Paraphrase Generation"): a generator rewrites each passage of the author's posts
plainly, keeping every fact and dropping the voice; the model is then trained to map the plain
version back to the author's original. Used the other way round, it puts any draft (an email,
a post, a reply written plainly or by a bigger model) into the author's voice.

Every paraphrase is validated before it becomes a pair, each rejection counted under its reason
(``REASONS``), as ingest does:

- it keeps the content: at least ``min_content`` of the original's content words are in it
  (``text.content_words``: lower-cased words of 3+ letters that are not stopwords);
- it has about the original's length: its words / the original's in ``length_ratio``;
- it is no copy: at most ``max_copied`` of its words lie in runs of 6+ words found verbatim in
  the original (``text.copied_share``);
- it loses the voice: the cosine distance between its function-word profile and the
  original's (``style_distance``, the words of ``text.FUNCTION_WORDS``, pronouns included, so
  "I" turned into "the author" counts) is at least ``min_style_distance``.

The generator is ingest's (``voicetune.models.generators``: the base model in-process or any
OpenAI-compatible endpoint) and its replies are cached the same way (``cached_complete``).
Each pair kept becomes a sample of ``voicetune.data.rewrite``'s format: [persona, the
instruction + the draft, the author's original], the loss on the original only
(``train.mask_prompt``).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from voicetune.data.rewrite import user_message
from voicetune.data.text import MARKUP, content_kept, copied_share, length_ratio, style_distance
from voicetune.models.generators import cached_complete

# Bump when the paraphrase prompt's wording changes: it is part of every cache key.
PROMPT_VERSION = "rewrite-v1"

REASONS = {
    "cut": "the paraphrase hit rewrite.max_tokens before it ended",
    "markup": "the reply holds a chat-template token such as <|im_end|>",
    "content_dropped": "under rewrite.min_content of the original's content words are kept",
    "length": "its length is outside rewrite.length_ratio times the original's",
    "copied": "over rewrite.max_copied of it is verbatim runs of the original (6+ words)",
    "voice_kept": "its function-word profile is within rewrite.min_style_distance of the "
                  "original's: it still sounds like the author",
}


# ------------------------------------------------------------------------------ the paraphrase
def plain_chat(text: str) -> list[dict]:
    """Ask for ``text`` rewritten plainly: every fact kept, the voice dropped. The third person
    takes the author's "I" away; on the 135M model this wording drew fewer refusals and copies
    than asking for "neutral, impersonal English": of the sample posts cut into 38 passages of up
    to 120 words, 9 paraphrases passed the default checks, against 6."""
    return [{"role": "user", "content": (
        f"Rewrite this text in the third person, in short plain sentences, keeping every fact:\n\n{text}")}]


def checks(plain: str, original: str) -> dict:
    """The measures the validation reads, rounded: the same bytes from run to run."""
    return {"content_kept": round(content_kept(plain, original), 4),
            "length_ratio": round(length_ratio(plain, original), 4),
            "copied": round(copied_share(plain, original), 4),
            "style_distance": round(style_distance(plain, original), 4)}


_PREAMBLE = re.compile(r"^\s*(?:here(?:'s| is)[^\n:]*:|rewritten text:|text:)\s*", re.IGNORECASE)


def clean(reply: str) -> str:
    """The paraphrase without a preamble line ("Here is the rewritten text:") or quotes."""
    text = _PREAMBLE.sub("", reply.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return text


def check_paraphrase(text: str, finish_reason: str, original: str, p: dict
                     ) -> tuple[str | None, dict]:
    """(the reason this paraphrase is rejected, a key of REASONS, or None to keep it; its
    measures). ``p``: the ``rewrite`` params."""
    measures = checks(text, original)
    if finish_reason == "length":
        return "cut", measures
    if MARKUP.search(text):
        return "markup", measures
    low, high = p["length_ratio"]
    if not low <= measures["length_ratio"] <= high:
        return "length", measures
    if measures["copied"] > p["max_copied"]:
        return "copied", measures
    if measures["content_kept"] < p["min_content"]:
        return "content_dropped", measures
    if measures["style_distance"] < p["min_style_distance"]:
        return "voice_kept", measures
    return None, measures


# ------------------------------------------------------------------------------ the run
def run(passages: list, generator, p: dict, cache_dir: str | Path,
        progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """(rows, metrics): one paraphrase per passage, validated. Each row kept is a conversation
    in prepare's format (the instruction and the plain draft, then the author's original) with
    ``task: rewrite`` and its provenance (post, passage, generator, prompt version) and
    measures."""
    start = time.perf_counter()
    replies, asked = cached_complete(generator, [plain_chat(x.text) for x in passages], cache_dir,
                                     PROMPT_VERSION, progress=progress, batch_size=p["batch_size"])
    seconds = time.perf_counter() - start
    rejected = dict.fromkeys(REASONS, 0)
    rows = []
    for passage, reply in zip(passages, replies):
        draft = clean(reply.text)
        reason, measures = check_paraphrase(draft, reply.finish_reason, passage.text, p)
        if reason:
            rejected[reason] += 1
            continue
        rows.append({"conversation": [{"role": "user", "content": user_message(draft)},
                                      {"role": "assistant", "content": passage.text}],
                     "task": "rewrite", "post_id": passage.post_id, "passage_id": passage.id,
                     "generator": generator.name, "prompt_version": PROMPT_VERSION, **measures})
    metrics = {"generator": generator.name, "prompt_version": PROMPT_VERSION,
               "passages": len(passages), "cache_hits": len(passages) - asked,
               "passages_generated": asked, "pairs": len(rows), "rejected": rejected,
               "generation_seconds": round(seconds, 1),
               "pairs_per_minute": round(len(rows) / seconds * 60, 2) if asked and seconds > 0 else None}
    return rows, metrics
