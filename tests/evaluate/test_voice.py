"""The voice score (voicetune/evaluate/voice.py, stages/voice.py) on constructed authors whose
answer is known, and on the shared real blog set."""
import json
import subprocess
import sys

import numpy as np
import pytest

from voicetune.evaluate.voice import (VoiceScorer, cross_fit, distort, evaluate_voice,
                                      exclude_held_out, windows)

from tests.conftest import ROOT, shared_file, write_jsonl

# The same topic words for everyone: only the function words and punctuation tell the authors apart.
TOPIC = ("harbour ferry tide engine sail mast deck crew storm chart ballast rope anchor wind "
         "compass keel hull gale channel buoy lighthouse cargo galley bridge radar fog").split()
# Author A: formal, "upon", "whilst", semicolons; author B: chatty, "just", "really", dashes.
HABITS = {
    "A": (("the", "of", "upon", "which", "whilst", "indeed", "shall", "one", "thus", "rather"), "; ", "."),
    "B": (("a", "that", "so", "just", "really", "like", "you", "my", "but", "anyway"), " - ", "!"),
}


def text(author: str, rng, chars: int, cut: bool = False) -> str:
    """Sentences of topic words and the author's function words, about ``chars`` long; ``cut``:
    stopped mid-word, as an answer at the token limit."""
    words, joiner, stop = HABITS[author]
    sentences = []
    while sum(map(len, sentences)) < chars:
        parts = [" ".join(rng.choice(words if rng.random() < 0.5 else TOPIC) for _ in range(6))
                 for _ in range(2)]
        sentences.append(joiner.join(parts).capitalize() + stop)
    whole = " ".join(sentences)
    return whole[:chars] if cut else whole


def corpus(author: str, n: int, seed: int, chars: int = 300, cut: bool = False) -> list[str]:
    rng = np.random.default_rng(seed)
    return [text(author, rng, chars, cut) for _ in range(n)]


def test_masking_keeps_function_words_punctuation_and_shape_and_hides_topic():
    assert distort("Half the crew came up on deck at 3, didn't they?") == \
        "**** the **** **** up on **** at #, didn't they?"
    assert distort("I’ve sailed") == "I’ve ******"


def test_windows_are_equal_and_drop_the_short_tail():
    assert windows("abcdefghij", 4) == ["abcd", "efgh"]
    assert windows("ab  c", 8) == ["ab c"]  # shorter than a window: itself, whitespace collapsed


def test_two_authors_with_different_function_word_habits_are_told_apart():
    scorer = VoiceScorer(window_chars=120).fit(corpus("A", 150, 1), corpus("B", 40, 2))
    summary, per_question = evaluate_voice(scorer, corpus("A", 30, 3),
                                           {"base": corpus("B", 30, 4), "mimic": corpus("A", 30, 5)}, seed=0)
    assert summary["informative"] and summary["auc_author_vs_base"]["ci95_low"] > 0.9
    assert summary["ceiling"]["score"] > 0.8 > 0.2 > summary["floor"]
    # a model writing like the author closes (about) the whole gap, and wins every question
    mimic = summary["models"]["mimic"]
    assert mimic["gap_closed"]["ci95_low"] > 0.8 and mimic["vs_base"]["wins"] == 30
    assert 0.3 < mimic["auc_vs_author"] < 0.7  # indistinguishable from the author
    assert len(per_question) == 30 and set(per_question[0]) == {"author", "base", "mimic"}


def test_shuffled_labels_give_an_uninformative_verdict():
    texts = corpus("A", 100, 1) + corpus("B", 100, 2)
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled = [texts[i] for i in order]
    scorer = VoiceScorer(window_chars=120).fit(shuffled[:150], shuffled[150:])
    summary, _ = evaluate_voice(scorer, corpus("A", 40, 3), {"base": corpus("B", 40, 4)}, seed=0)
    assert not summary["informative"]
    assert summary["auc_author_vs_base"]["ci95_low"] <= 0.5 <= summary["auc_author_vs_base"]["ci95_high"]
    assert summary["verdict"].startswith("uninformative on this data")


def test_it_is_no_length_or_truncation_detector():
    """The same writer, but the 'other' texts are three times as long and cut mid-word, as
    the base model's answers at the token limit: length alone separates them perfectly, the
    voice score must not. (Scored on whole texts instead of windows, it does: AUC 0.998.)"""
    author = corpus("A", 150, 1, chars=250)
    other = corpus("A", 40, 2, chars=800, cut=True)
    scorer = VoiceScorer(window_chars=120).fit(author, other)
    summary, _ = evaluate_voice(scorer, corpus("A", 40, 3, chars=250),
                                {"base": corpus("A", 40, 4, chars=800, cut=True)}, seed=0)
    assert summary["length_check"]["auc_length_alone"] == 1.0
    assert not summary["informative"], summary["auc_author_vs_base"]


def test_the_same_input_gives_the_same_bytes():
    def run():
        scorer = VoiceScorer(window_chars=120).fit(corpus("A", 60, 1), corpus("B", 20, 2))
        return json.dumps(evaluate_voice(scorer, corpus("A", 20, 3), {"base": corpus("B", 20, 4)}, seed=7))
    assert run() == run()


def test_cross_fitting_never_scores_a_text_with_a_fit_that_saw_it():
    """Each fold is scored by a model fit against the OTHER folds' base answers: changing one
    base answer changes no score in its own fold but its own."""
    refs, base = corpus("A", 20, 3), corpus("B", 20, 4)
    author = corpus("A", 80, 1)
    _, before = cross_fit(author, refs, {"base": base}, seed=0, window_chars=120)
    changed = list(base)
    changed[0] = corpus("A", 1, 9)[0]
    _, after = cross_fit(author, refs, {"base": changed}, seed=0, window_chars=120)
    fold_of = np.random.default_rng(0).permutation(20) % 2
    same_fold = [i for i in range(1, 20) if fold_of[i] == fold_of[0]]
    other_fold = [i for i in range(20) if fold_of[i] != fold_of[0]]
    assert all(before[i] == after[i] for i in same_fold)
    assert any(before[i] != after[i] for i in other_fold)  # the other fold's fit did see it


def test_held_out_questions_and_answers_are_left_out_of_the_author_corpus():
    from voicetune.data.qa import Exchange

    exchanges = [Exchange("Why reef early?", "Because.", "f:1", 0),
                 Exchange("What knot?", "A bowline, every time.", "f:2", 1),
                 Exchange("Best boat?", "Mine.", "f:3", 2)]
    rows = [{"question": "why REEF early", "reference": "x", "prediction": "y"},
            {"prompt": "<|user|>\nOther?<|end|>", "reference": "A bowline, every time.", "prediction": "z"}]
    kept, dropped = exclude_held_out(exchanges, rows)
    assert kept == ["Mine."] and dropped == 2


# ------------------------------------------------------------------------------ the stage
def stage_project(tmp_path, references: list[str]):
    """A project folder for stages/voice.py: params, train split, negatives, base and lora runs."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for folder in ("data/processed", "data/voice", "data/eval"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    train = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": t}]}
             for i, t in enumerate(corpus("A", 80, 1))]
    write_jsonl(tmp_path / "data/processed/train.jsonl", train)
    write_jsonl(tmp_path / "data/voice/negatives.jsonl",
                [{"prompt": "p", "reference": "r", "prediction": t} for t in corpus("B", 25, 2)])
    for name, preds in (("base", corpus("B", 12, 4)), ("lora", corpus("A", 12, 5))):
        write_jsonl(tmp_path / f"data/eval/{name}.jsonl",
                    [{"question": f"t{i}", "reference": r, "prediction": p}
                     for i, (r, p) in enumerate(zip(references, preds))])


def run_stage(tmp_path) -> tuple[dict, list[dict]]:
    subprocess.run([sys.executable, str(ROOT / "stages/voice.py"), "--models", "base", "lora"],
                   cwd=tmp_path, check=True, capture_output=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    return (json.loads((tmp_path / "metrics/voice.json").read_text()),
            [json.loads(x) for x in (tmp_path / "data/voice/scores.jsonl").read_text().splitlines()])


def test_the_stage_fits_on_the_train_split_only(tmp_path):
    """A held-out answer of the author (a test reference) changed: if it went into the fit,
    every other text's score would move. Only its own may."""
    references = corpus("A", 12, 3)
    stage_project(tmp_path, references)
    summary, before = run_stage(tmp_path)
    assert summary["fit"]["author_texts"] == 80 and summary["fit"]["other_texts"] == 25
    references[0] = corpus("B", 1, 8)[0]  # now unlike the author
    stage_project(tmp_path, references)
    _, after = run_stage(tmp_path)
    assert after[0]["author"] != before[0]["author"]
    assert [r for r in after[1:]] == [r for r in before[1:]]
    assert [r["lora"] for r in after] == [r["lora"] for r in before]


def test_no_negatives_is_a_message_and_keeps_the_last_good_outputs(tmp_path):
    stage_project(tmp_path, corpus("A", 12, 3))
    run_stage(tmp_path)
    before = (tmp_path / "metrics/voice.json").read_bytes()
    (tmp_path / "data/voice/negatives.jsonl").write_text("")
    failed = subprocess.run([sys.executable, str(ROOT / "stages/voice.py"), "--models", "base", "lora"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "0 by others" in failed.stderr and "dvc repro voice_negatives" in failed.stderr
    assert (tmp_path / "metrics/voice.json").read_bytes() == before


# ------------------------------------------------------------------------------ the shared blog set
def test_on_the_shared_blog_set_the_author_is_told_from_the_base_model():
    """The real 2,129-pair blog set and the published reference run (212 held-out questions):
    cross-fitted (no base answers to training questions were published). Measured: AUC 0.936
    (95% CI 0.908 … 0.959), the LoRA closes 99.0% of the gap (91.3% … 106.8%)."""
    from voicetune.data.qa import load_exchanges

    exchanges = load_exchanges([shared_file("datasets/blog-qa/blog_qa.jsonl")])
    rows = {name: [json.loads(x) for x in shared_file(f"reference/blog-eval/{name}_predictions.jsonl")
                   .read_text().splitlines()] for name in ("base", "lora")}
    author, dropped = exclude_held_out(exchanges, rows["base"])
    assert dropped == 212  # every held-out question is in the corpus: all left out of the fit
    summary, _ = cross_fit(author, [r["reference"] for r in rows["base"]],
                           {n: [r["prediction"] for r in rs] for n, rs in rows.items()}, seed=0)
    assert summary["informative"] and summary["auc_author_vs_base"]["ci95_low"] > 0.85
    lora = summary["models"]["lora"]
    assert lora["vs_base"]["ci95_low"] > 0 and lora["gap_closed"]["ci95_low"] > 0.5


# ------------------------------------------------------------------------------ the tool
def test_the_tool_scores_prediction_files_against_an_author_corpus(tmp_path, capsys):
    """`make voice`: the author's corpus minus the held-out questions, cross-fitted on the
    base file's answers; files of other questions are refused with the line that differs."""
    from voicetune.tools.voice import main

    questions = [f"Question {i}?" for i in range(16)]
    refs, base, mimic = corpus("A", 16, 3), corpus("B", 16, 4), corpus("A", 16, 5)
    corpus_rows = [{"messages": [{"role": "user", "content": f"Old {i}?"}, {"role": "assistant", "content": t}]}
                   for i, t in enumerate(corpus("A", 60, 1))]
    corpus_rows.append({"messages": [{"role": "user", "content": questions[0]},
                                     {"role": "assistant", "content": refs[0]}]})  # held out: left out
    write_jsonl(tmp_path / "author.jsonl", corpus_rows)
    for name, preds in (("base", base), ("mimic", mimic)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"question": q, "reference": r, "prediction": p}
                                                  for q, r, p in zip(questions, refs, preds)])
    assert main(["--author", str(tmp_path / "author.jsonl"), "--window-chars", "120",
                 str(tmp_path / "base.jsonl"), str(tmp_path / "mimic.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("60 of the author's answers fit (1 left out: held-out questions); 16 held-out")
    assert "the score tells the author's held-out answers from the base model's" in out
    write_jsonl(tmp_path / "other.jsonl", [{"question": "Else?", "reference": "r", "prediction": "p"}] * 16)
    assert main(["--author", str(tmp_path / "author.jsonl"), str(tmp_path / "base.jsonl"),
                 str(tmp_path / "other.jsonl")]) == 2
    assert "other.jsonl:1: question 'Else?' differs" in capsys.readouterr().err
