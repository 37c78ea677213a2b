"""Preference pairs from votes (voicetune/preference_pairs.py): the winner's answer is chosen,
ties and both-bad are left out, and the file is what mlx-lm-lora's DPO loader reads."""
from __future__ import annotations

import json

import pytest

from voicetune.errors import UserError
from voicetune.preference_pairs import pairs_from_votes, write_pairs

PERSONA = "You are Captain Tilly Brask."


def vote(choice: str, question: str = "Reef early?", a: str = "Aye, always.", b: str = "Maybe.",
         system: str | None = PERSONA) -> dict:
    return {"schema": 1, "battle_id": "x", "question": question, "model_a": "lora",
            "model_b": "base", "answer_a": a, "answer_b": b, "vote": choice, "system": system,
            "adapter": "c89e.dir"}


def test_the_winner_is_chosen_and_ties_and_both_bad_are_left_out():
    pairs = pairs_from_votes([vote("A"), vote("B"), vote("tie"), vote("both_bad")])
    assert pairs == [
        {"prompt": "Reef early?", "chosen": "Aye, always.", "rejected": "Maybe.", "system": PERSONA},
        {"prompt": "Reef early?", "chosen": "Maybe.", "rejected": "Aye, always.", "system": PERSONA},
    ]


def test_no_system_key_without_a_persona_and_no_pair_of_equal_answers():
    pairs = pairs_from_votes([vote("A", system=None), vote("A", system=""),
                              vote("A", a="Same.", b="Same."), vote("A", question=" ")])
    # the loader adds a system message whenever the key is there, even a null one
    assert pairs == [{"prompt": "Reef early?", "chosen": "Aye, always.", "rejected": "Maybe."}] * 2


def test_an_empty_answer_can_lose():
    assert pairs_from_votes([vote("A", b="")])[0]["rejected"] == ""


def test_write_pairs_is_jsonl_the_dpo_loader_reads(tmp_path):
    pairs = pairs_from_votes([vote("A", question="Ça va, capitaine ?"), vote("B")])
    path = tmp_path / "pairs" / "train.jsonl"
    write_pairs(path, pairs)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == pairs
    assert "Ça va" in lines[0]  # UTF-8, not \u escapes
    # what mlx-lm-lora's DPODataset does with a row: every key it reads is a string
    for row in map(json.loads, lines):
        messages = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + \
            [{"role": "user", "content": row["prompt"]}]
        for key in ("chosen", "rejected"):
            conversation = messages + [{"role": "assistant", "content": row[key]}]
            assert all(isinstance(m["content"], str) and m["content"] for m in conversation[:-1])
    write_pairs(path, [])  # no pairs: an empty file, replaced atomically
    assert path.read_text() == ""


def test_write_pairs_refuses_the_votes_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    votes = tmp_path / "data/arena/votes.jsonl"
    votes.parent.mkdir(parents=True)
    votes.write_text(json.dumps(vote("A")) + "\n")
    before = votes.read_bytes()
    with pytest.raises(UserError, match="is the votes file"):
        write_pairs("data/arena/votes.jsonl", [])
    with pytest.raises(UserError, match="is the votes file"):
        write_pairs(votes, [])
    assert votes.read_bytes() == before
