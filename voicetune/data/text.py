"""Measures of one text against another, shared by ingest, the rewrite task and the voice score:
content words kept, verbatim copying, and the distance between two texts' function-word
profiles.

Function words (articles, pronouns, prepositions, auxiliaries) carry how someone writes, not
what about: Burrows' Delta compares their frequencies, and the voice score masks every other
word. Content words are the rest: what a text is about.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import Counter

from voicetune.data.qa import normalized

# English function words: articles, pronouns, prepositions, conjunctions, auxiliaries, common
# adverbs and their contractions (after Mosteller & Wallace's and Burrows' lists). Words that
# carry a topic are not here: they are what the masking hides.
FUNCTION_WORDS = tuple(sorted(set("""
a about above after again against all almost along already also although always am among an
and another any anyone anything are around as at away be because been before being below
between both but by can cannot could did do does doing done down during each either else
enough even ever every everything few for from further had has have having he her here hers
herself him himself his how however i if in indeed instead into is it its itself just least
less let like little many may me might mine more most much must my myself neither never no
nobody none nor not nothing now of off often on once one only onto or other others otherwise
ought our ours ourselves out over own perhaps quite rather really same several shall she
should since so some somebody someone something sometimes still such than that the their
theirs them themselves then there therefore these they this those though through thus till
to too toward towards under unless until up upon us very was we well were what whatever when
whenever where whereas wherever whether which while who whoever whole whom whose why will
with within without would yet you your yours yourself yourselves
i'm i've i'd i'll you're you've you'd you'll he's she's it's we're we've we'd we'll they're
they've they'd they'll that's there's here's what's who's let's isn't aren't wasn't weren't
don't doesn't didn't haven't hasn't hadn't won't wouldn't can't couldn't shouldn't mustn't
""".split())))
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_INDEX = {w: i for i, w in enumerate(FUNCTION_WORDS)}


def function_profile(text: str) -> list[float]:
    """The relative frequency of each of ``FUNCTION_WORDS`` among the text's words."""
    words = [w.replace("’", "'") for w in WORD.findall(text.casefold())]
    counts = Counter(w for w in words if w in _INDEX)
    vec = [0.0] * len(FUNCTION_WORDS)
    for w, c in counts.items():
        vec[_INDEX[w]] = c / len(words)
    return vec


def style_distance(a: str, b: str) -> float:
    """1 - the cosine similarity of the two texts' function-word profiles (0: the same habits;
    1: none shared, or a text without any function word)."""
    x, y = function_profile(a), function_profile(b)
    dot = sum(p * q for p, q in zip(x, y))
    norm = math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y))
    return 1.0 - dot / norm if norm else 1.0


COPY_RUN = 6  # words: a shared run this long is copying, not a phrase that happens to recur

# Words that carry no content: grounding compares what remains. A short list on purpose;
# first-person pronouns are here too, since the answer rewrites the passage's "I" as its own.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just like me more most my myself no nor not now of off on once only or other our
ours ourselves out over own really same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself
yourselves one get got make made thing things much many way even well still back know think
""".split())

MARKUP = re.compile(r"<\|[^|]*\|>|<question>|<answer>")


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ letters that are not stopwords, a plural 's' dropped."""
    words = re.findall(r"[^\W\d_]{3,}", text.casefold())
    return {w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words if w not in STOPWORDS}


def copied_share(answer: str, passage: str) -> float:
    """The share of the answer's words that lie in runs of COPY_RUN+ words found verbatim
    (case and punctuation aside) in the passage."""
    a, b = normalized(answer).split(), normalized(passage).split()
    if not a:
        return 0.0
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    return sum(blk.size for blk in blocks if blk.size >= COPY_RUN) / len(a)


def content_kept(text: str, source: str) -> float:
    """The share of ``source``'s content words that ``text`` has too."""
    theirs = content_words(source)
    return len(theirs & content_words(text)) / len(theirs) if theirs else 1.0


def length_ratio(text: str, source: str) -> float:
    return len(text.split()) / max(len(source.split()), 1)
