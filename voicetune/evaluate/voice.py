"""Does it sound like the author? The voice score: authorship verification fit on the train split.

A logistic regression (scikit-learn) learns to tell the author's own answers from other text
written for the same questions: the base model's answers to a seeded sample of the training
questions (stage ``voice_negatives``). Only the train split goes into the fit; the test split's
answers (the author's references and every model's predictions) are only scored. The features
carry style rather than topic:

- character n-grams (``eval.voice.char_ngrams``, 2-4 by default) of the text with its content
  masked: each letter of a word that is not a function word becomes ``*``, each digit ``#``
  ("text distortion", Stamatatos 2017). What is left is punctuation, word lengths, capitals,
  contractions, markdown and the function words themselves: "Half the crew came up" reads
  ``**** the **** **** up``;
- the relative frequencies of ``FUNCTION_WORDS`` (the profile Burrows' Delta compares).

**Length and truncation.** The base model's answers are long and often cut at the token limit;
the author's are short and end on a full stop. Every text is therefore cut into windows of
exactly ``eval.voice.window_chars`` characters (the last, shorter piece dropped, unless the text
is shorter than one window), both to fit and to score, and a text's score is the mean
P(author) over its windows: the classifier never sees how long a text is or where it stopped.
``length_check`` shows it: the AUC that length alone reaches on the same texts, and the
score's AUC on each text's first window only.

**Calibration.** The same score on the author's own held-out test answers is the ceiling, on
the base model's answers to those questions the floor. Their AUC (with a bootstrap CI over
questions) says whether the score can tell the author at all; when the CI's low end is not
above 0.5 the score is reported as uninformative on this data, not as a result. A model's
``gap_closed`` = (its score - floor) / (ceiling - floor): 0 is the base model, 1 the author.
"""
from __future__ import annotations

import re

import numpy as np

from voicetune.core.errors import UserError
from voicetune.data.text import FUNCTION_WORDS, WORD as _WORD

_FUNCTION = frozenset(FUNCTION_WORDS)
_TOKEN = r"(?u)[^\W\d_]+(?:['’][^\W\d_]+)*"
ROUNDS = 2000  # bootstrap resamples for the AUC and the gap closed
DIGITS = 6     # figures are rounded: the same bytes from run to run


def distort(text: str) -> str:
    """The text with its content masked: letters of non-function words -> ``*``, digits -> ``#``."""
    def mask(m: re.Match) -> str:
        word = m.group(0)
        return word if word.lower().replace("’", "'") in _FUNCTION else "*" * len(word)
    return re.sub(r"\d", "#", _WORD.sub(mask, text))


def windows(text: str, size: int) -> list[str]:
    """``text`` (whitespace collapsed) in pieces of exactly ``size`` characters, the last,
    shorter piece dropped; a text shorter than ``size`` is its own only window."""
    text = " ".join(text.split())
    if len(text) <= size:
        return [text]
    return [text[i:i + size] for i in range(0, len(text) - size + 1, size)]


FEATURES = ("both", "char_ngrams", "function_words")


def build_classifier(char_ngrams: tuple[int, int], C: float, features: str = "both"):
    """The scikit-learn pipeline: masked character n-grams + function-word profile (or one of
    them: ``features``) -> logistic regression (classes weighted to balance, lbfgs:
    deterministic)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    chars = TfidfVectorizer(analyzer="char", ngram_range=tuple(char_ngrams), preprocessor=distort,
                            sublinear_tf=True, min_df=2, lowercase=False, dtype=np.float64)
    # relative frequencies (l2-normalized, no idf): every function word counts, rare or not
    words = TfidfVectorizer(vocabulary=FUNCTION_WORDS, token_pattern=_TOKEN, use_idf=False,
                            preprocessor=lambda t: t.lower().replace("’", "'"), dtype=np.float64)
    blocks = {"both": [chars, words], "char_ngrams": [chars], "function_words": [words]}[features]
    return make_pipeline(make_union(*blocks),
                         LogisticRegression(C=C, class_weight="balanced", max_iter=2000))


class VoiceError(UserError, ValueError):
    pass


class VoiceScorer:
    """P(the author wrote it), fit on windows of the author's texts against other texts."""

    def __init__(self, window_chars: int = 160, char_ngrams=(2, 4), C: float = 1.0,
                 features: str = "both"):
        self.window_chars, self.char_ngrams, self.C = window_chars, tuple(char_ngrams), C
        self.features = features

    def fit(self, author: list[str], other: list[str]) -> "VoiceScorer":
        if not author or not other:
            raise VoiceError(f"the voice score needs texts of both classes: got {len(author)} by "
                             f"the author and {len(other)} by others (the training split, and the "
                             "base model's answers of `dvc repro voice_negatives`)")
        a = [w for t in author for w in windows(t, self.window_chars)]
        o = [w for t in other for w in windows(t, self.window_chars)]
        self.classifier = build_classifier(self.char_ngrams, self.C, self.features)
        self.classifier.fit(a + o, [1] * len(a) + [0] * len(o))
        self.fit_counts = {"author_texts": len(author), "other_texts": len(other),
                           "author_windows": len(a), "other_windows": len(o)}
        return self

    def window_scores(self, texts: list[str]) -> list[np.ndarray]:
        """P(author) of each window of each text."""
        pieces = [windows(t, self.window_chars) for t in texts]
        flat = [w for p in pieces for w in p]
        if not flat:
            return [np.zeros(0) for _ in texts]
        probs = self.classifier.predict_proba(flat)[:, 1]
        ends = np.cumsum([len(p) for p in pieces])
        return np.split(probs, ends[:-1])

    def score(self, texts: list[str]) -> list[float]:
        """Each text's mean P(author) over its windows."""
        return [float(p.mean()) for p in self.window_scores(texts)]

    def first_window_score(self, texts: list[str]) -> list[float]:
        return [float(p[0]) for p in self.window_scores(texts)]


# ------------------------------------------------------------------------------ figures
def _r(x):
    return None if x is None or not np.isfinite(x) else round(float(x), DIGITS)


def auc(positive, negative) -> float:
    """P(a random positive scores above a random negative), ties half (Mann-Whitney)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([1] * len(positive) + [0] * len(negative),
                               list(positive) + list(negative)))


def paired_auc(positive, negative, seed: int, rounds: int = ROUNDS) -> dict:
    """AUC of ``positive`` vs ``negative`` scores (one of each per question) with a 95%
    bootstrap CI that resamples questions."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pos), size=(rounds, len(pos)))
    # Mann-Whitney in numpy: all rounds at once (roc_auc_score per round is 100x slower)
    diff = pos[idx][:, :, None] - neg[idx][:, None, :]
    boot = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2))
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"value": _r(auc(pos, neg)), "ci95_low": _r(low), "ci95_high": _r(high)}


def gap_closed(model, floor, ceiling, seed: int, rounds: int = ROUNDS) -> dict:
    """(model - floor) / (ceiling - floor) of the per-question mean scores, with a 95% CI
    resampling questions (the same questions for all three)."""
    m, f, c = (np.asarray(x, float) for x in (model, floor, ceiling))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), size=(rounds, len(m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (m[idx].mean(1) - f[idx].mean(1)) / (c[idx].mean(1) - f[idx].mean(1))
        value = (m.mean() - f.mean()) / (c.mean() - f.mean())
    boot = boot[np.isfinite(boot)]
    low, high = np.quantile(boot, [0.025, 0.975]) if boot.size else (None, None)
    return {"value": _r(value), "ci95_low": _r(low), "ci95_high": _r(high)}


def mean_ci(values, seed: int, rounds: int = ROUNDS) -> dict:
    v = np.asarray(values, float)
    boot = v[np.random.default_rng(seed).integers(0, len(v), size=(rounds, len(v)))].mean(1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"score": _r(v.mean()), "ci95_low": _r(low), "ci95_high": _r(high)}


def evaluate_voice(scorer: VoiceScorer, references: list[str], runs: dict[str, list[str]],
                   seed: int, kind: str = "answers") -> tuple[dict, list[dict]]:
    """Score the author's held-out ``references`` and each model's answers to the same
    questions (``runs``: name -> predictions, ``base`` among them) with a fitted ``scorer``.
    Returns the summary (metrics/voice.json) and one record per question."""
    _check_runs(references, runs)
    texts = {"author": references, **runs}
    full = {name: scorer.score(t) for name, t in texts.items()}
    first = {name: scorer.first_window_score(t) for name, t in (("author", references), ("base", runs["base"]))}
    return summarize(full, first, texts, scorer, seed, kind)


def feature_aucs(author_train: list[str], other: list[str], references: list[str],
                 base: list[str], seed: int, **scorer_args) -> dict:
    """The held-out AUC (author vs base, with its CI) of each feature set on its own and of
    both together: which part of the voice the score reads."""
    out = {}
    for features in FEATURES:
        scorer = VoiceScorer(**scorer_args, features=features).fit(author_train, other)
        out[features] = paired_auc(scorer.score(references), scorer.score(base), seed)
    return out


def cross_fit(author_train: list[str], references: list[str], runs: dict[str, list[str]],
              seed: int, folds: int = 2, **scorer_args) -> tuple[dict, list[dict]]:
    """The voice score where no base answers to training questions exist (a published
    evaluation run): the questions are split in ``folds`` seeded folds, and each fold is scored
    by a model fit on the author's training answers against the base model's answers to the
    OTHER folds' questions. No scored text is ever in the fit that scores it."""
    _check_runs(references, runs)
    texts = {"author": references, **runs}
    fold_of = np.random.default_rng(seed).permutation(len(references)) % folds
    full = {name: [0.0] * len(references) for name in texts}
    first = {name: [0.0] * len(references) for name in ("author", "base")}
    counts = []
    for k in range(folds):
        inside = np.flatnonzero(fold_of == k)
        negatives = [runs["base"][i] for i in np.flatnonzero(fold_of != k)]
        scorer = VoiceScorer(**scorer_args).fit(author_train, negatives)
        counts.append(scorer.fit_counts)
        for name, t in texts.items():
            for i, value in zip(inside, scorer.score([t[i] for i in inside])):
                full[name][i] = value
        for name in first:
            for i, value in zip(inside, scorer.first_window_score([texts[name][i] for i in inside])):
                first[name][i] = value
    scorer.fit_counts = {key: [c[key] for c in counts] for key in counts[0]}  # per fold
    summary, records = summarize(full, first, texts, scorer, seed)
    summary["fit"]["cross_fit_folds"] = folds
    return summary, records


def _check_runs(references: list[str], runs: dict[str, list[str]]) -> None:
    if "base" not in runs:
        raise VoiceError("the voice score is calibrated on the base model's answers: runs must include base")
    for name, preds in runs.items():
        if len(preds) != len(references):
            raise VoiceError(f"{name} has {len(preds)} answers for {len(references)} questions")


def summarize(full: dict[str, list[float]], first: dict[str, list[float]],
              texts: dict[str, list[str]], scorer: VoiceScorer, seed: int,
              kind: str = "answers") -> tuple[dict, list[dict]]:
    """The figures from per-question scores: ``full`` (mean over windows) and ``first`` (first
    window only) for "author" (the held-out answers) and each model, "base" among them."""
    from voicetune.evaluate.metrics import compare

    author, floor = full["author"], full["base"]
    held_out = paired_auc(author, floor, seed)
    informative = held_out["ci95_low"] is not None and held_out["ci95_low"] > 0.5
    models = {}
    for name, s in full.items():
        if name == "author":
            continue
        entry = mean_ci(s, seed)
        entry["gap_closed"] = gap_closed(s, floor, author, seed) if name != "base" else \
            {"value": 0.0, "ci95_low": 0.0, "ci95_high": 0.0}
        if name != "base":
            entry["vs_base"] = {k: _r(v) if isinstance(v, float) else v
                                for k, v in compare(s, floor, seed).items()}
        entry["auc_vs_author"] = _r(auc(author, s))  # 0.5: the score cannot tell it from the author
        models[name] = entry
    lengths = {name: [len(t) for t in ts] for name, ts in texts.items()}
    summary = {
        "informative": bool(informative),
        "verdict": verdict(held_out, informative, kind),
        "auc_author_vs_base": held_out,
        "ceiling": mean_ci(author, seed),
        "floor": models["base"]["score"],
        "models": models,
        "length_check": {
            # how well length alone tells the author's answers from base's: what the windows hide
            "auc_length_alone": _r(max(auc(lengths["author"], lengths["base"]),
                                       auc(lengths["base"], lengths["author"]))),
            # the score on each text's first window only: equal lengths, no ending seen
            "auc_first_window_only": _r(auc(first["author"], first["base"])),
            "texts_shorter_than_window": {n: int(sum(x < scorer.window_chars for x in v))
                                          for n, v in lengths.items()},
        },
        "fit": {**scorer.fit_counts, "window_chars": scorer.window_chars,
                "char_ngrams": list(scorer.char_ngrams), "C": scorer.C},
        "questions": len(author), "seed": seed, "bootstrap_rounds": ROUNDS,
    }
    per_question = [{name: _r(s[i]) for name, s in full.items()} for i in range(len(author))]
    return summary, per_question


def verdict(held_out: dict, informative: bool, kind: str = "answers") -> str:
    """What the held-out AUC says; ``kind``: what the author's held-out texts are (answers, or
    the originals of rewrites)."""
    auc_text = (f"AUC {held_out['value']:.3f} (95% CI {held_out['ci95_low']:.3f} … "
                f"{held_out['ci95_high']:.3f})")
    if informative:
        return f"the score tells the author's held-out {kind} from the base model's: {auc_text}"
    return (f"uninformative on this data: the score cannot tell the author's held-out {kind} from "
            f"the base model's ({auc_text}, the interval reaches 0.5); its figures are no result")


def exclude_held_out(exchanges: list, rows: list[dict]) -> tuple[list[str], int]:
    """The author's answers of ``exchanges`` (``.user``, ``.assistant``) that are not among
    the held-out ``rows`` (prediction rows: ``reference`` and ``question`` or ``prompt``):
    an exchange whose answer is a held-out reference, or whose question is a held-out
    question, is dropped. Returns the kept answers and how many were dropped."""
    from voicetune.data.qa import normalized

    answers = {normalized(r["reference"]) for r in rows}
    questions = {normalized(r["question"]) for r in rows if r.get("question")}
    prompts = [normalized(r["prompt"]) for r in rows if not r.get("question") and r.get("prompt")]
    kept = []
    for ex in exchanges:
        q = normalized(ex.user)
        if normalized(ex.assistant) in answers or q in questions or any(q in p for p in prompts):
            continue
        kept.append(ex.assistant)
    return kept, len(exchanges) - len(kept)
