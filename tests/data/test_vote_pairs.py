"""Preference pairs from votes (voicetune/data/vote_pairs.py): the winner's answer is chosen,
ties and both-bad are left out, and the file is what mlx-lm-lora's DPO loader reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from voicetune.core.errors import UserError
from voicetune.data.vote_pairs import pairs_from_votes, votes_used, write_pairs

from tests.conftest import ROOT

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


# ------------------------------------------------------------------ `arena export`, as run
def export(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voicetune.tools.arena", "export", *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)


def votes_file(path, votes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(v) + "\n" for v in votes))
    return path.read_bytes()


def write_lock(root, adapter: str = "c89e.dir") -> None:
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    outs:\n"
                                   f"    - path: models/adapters\n      md5: {adapter}\n")


@pytest.mark.parametrize("name", ["itself", "hard link", "symlink"])
@pytest.mark.parametrize("current", ["c89e.dir", "other.dir"])  # votes for it, or none (0 pairs)
def test_export_never_writes_over_the_votes_it_reads(tmp_path, name, current):
    votes = tmp_path / "mine/votes.jsonl"  # not the default path
    before = votes_file(votes, [vote("A"), vote("B"), vote("tie")])
    write_lock(tmp_path, current)
    out = {"itself": votes, "hard link": tmp_path / "link.jsonl", "symlink": tmp_path / "sym.jsonl"}[name]
    if name == "hard link":
        os.link(votes, out)
    elif name == "symlink":
        out.symlink_to(votes)
    result = export(tmp_path, "--votes", str(votes), "--out", str(out))
    assert result.returncode == 1 and "is the votes file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert votes.read_bytes() == before and out.read_bytes() == before


def test_export_into_a_folder_or_from_a_missing_file_is_an_error_that_writes_nothing(tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes_file(votes, [vote("A")])
    write_lock(tmp_path)
    (tmp_path / "pairs").mkdir()
    result = export(tmp_path, "--votes", str(votes), "--out", "pairs")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pairs is a folder" in result.stderr and list((tmp_path / "pairs").iterdir()) == []

    result = export(tmp_path, "--votes", "nosuch.jsonl", "--out", "out.jsonl")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--votes nosuch.jsonl: no such file" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_export_says_how_many_votes_it_read_and_why_it_left_some_out(tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes_file(votes, [vote("A"), vote("tie"), {**vote("B"), "adapter": "old.dir"},
                       {**vote("A"), "adapter": "old.dir"}])
    write_lock(tmp_path)
    result = export(tmp_path, "--votes", str(votes), "--out", "pairs.jsonl")
    assert result.returncode == 0, result.stderr
    assert f"4 vote(s) read from {votes}, 2 for the current weights (2 for other weights" in result.stdout
    assert "1 preference pair(s)" in result.stdout
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 1
    write_lock(tmp_path, "new.dir")  # retrained since: nothing is for the current weights
    result = export(tmp_path, "--votes", str(votes), "--out", "pairs.jsonl")
    assert "4 vote(s) read from" in result.stdout and "0 for the current weights (4 for other weights" \
        in result.stdout and "0 preference pair(s)" in result.stdout


def test_write_pairs_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    out.write_text("the last good pairs\n")

    def full_disk(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(UserError, match="cannot write .*No space left on device; nothing written"):
        write_pairs(out, pairs_from_votes([vote("A")]))
    assert out.read_text() == "the last good pairs\n" and sorted(tmp_path.iterdir()) == [out]


def test_the_votes_passed_on_are_every_vote_with_arena_and_none_read_without(tmp_path):
    """pairs_votes' rule: with arena among the sources every whole vote, the torn line a warning;
    without, the same answer whatever the votes file holds (it is not even read)."""
    votes = tmp_path / "votes.jsonl"
    votes.write_text(json.dumps(vote("A")) + "\n" + json.dumps(vote("tie")) + '\n{"vote": "B", "qu')
    used, warnings = votes_used(["self", "arena"], votes)
    assert used == {"votes_file": str(votes), "votes": [vote("A"), vote("tie")]}
    assert len(warnings) == 1 and ":3: not a whole vote (the last line, cut short)" in warnings[0]
    votes.write_bytes(b"\xff not even text")
    assert votes_used(["self"], votes) == ({"votes_file": None, "votes": []}, [])
    assert votes_used(["self"], tmp_path / "absent.jsonl") == ({"votes_file": None, "votes": []}, [])
