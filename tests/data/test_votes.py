"""data/arena/votes.jsonl: appended whole under a lock, durable, readable after a crash."""
import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

from voicetune.data import votes as votes_module
from voicetune.data.votes import append_vote, read_votes, weights_identity

from tests.conftest import ROOT


def vote(i: int, writer: int = 0) -> dict:
    # long answers: a line far bigger than a pipe buffer or a page, so interleaving would show
    return {"battle_id": f"{writer}-{i}", "vote": "A", "model_a": "lora", "model_b": "base",
            "answer_a": f"answer {i} " * 2000, "answer_b": "ok", "writer": writer}


def write_many(path, writer: int, n: int) -> None:
    for i in range(n):
        append_vote(path, vote(i, writer))


def test_concurrent_writers_never_interleave_or_lose_a_line(tmp_path):
    path = tmp_path / "arena/votes.jsonl"
    procs = [multiprocessing.get_context("spawn").Process(target=write_many, args=(path, w, 40))
             for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    votes, warnings = read_votes(path)
    assert warnings == []
    assert sorted(v["battle_id"] for v in votes) == sorted(f"{w}-{i}" for w in range(6) for i in range(40))
    assert all(v == vote(int(v["battle_id"].split("-")[1]), v["writer"]) for v in votes)


def test_a_half_written_last_line_is_skipped_with_a_warning_and_the_next_vote_is_whole(tmp_path):
    path = tmp_path / "votes.jsonl"
    append_vote(path, vote(1))
    append_vote(path, vote(2))
    whole = path.read_bytes()
    with open(path, "ab") as f:  # what a kill -9 in the middle of a write leaves
        f.write(json.dumps(vote(3)).encode()[:100])
    votes, warnings = read_votes(path)
    assert [v["battle_id"] for v in votes] == ["0-1", "0-2"]
    assert len(warnings) == 1 and ":3: not a whole vote (the last line, cut short)" in warnings[0]
    append_vote(path, vote(4))  # starts on a line of its own: the torn line stays alone
    votes, warnings = read_votes(path)
    assert [v["battle_id"] for v in votes] == ["0-1", "0-2", "0-4"] and len(warnings) == 1
    assert path.read_bytes().startswith(whole)  # earlier votes untouched, never rewritten


def test_a_writer_killed_mid_vote_leaves_the_earlier_votes_intact(tmp_path):
    """kill -9 a process that is writing votes as fast as it can: whatever it managed is
    whole votes, plus at most one torn last line, which is skipped."""
    path = tmp_path / "votes.jsonl"
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from tests.data.test_votes import write_many; "
            "write_many(sys.argv[1], 7, 100000)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(ROOT)], cwd=ROOT)
    deadline = time.time() + 60
    while (not path.exists() or path.stat().st_size < 2_000_000) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    votes, warnings = read_votes(path)
    assert len(votes) >= 50 and len(warnings) <= 1
    assert [v["battle_id"] for v in votes] == [f"7-{i}" for i in range(len(votes))]


def test_lines_that_are_not_votes_are_reported_not_trusted(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text('{"vote": "A", "battle_id": "x"}\n[1, 2]\n{"vote": "maybe"}\n\n')
    votes, warnings = read_votes(path)
    assert [v["battle_id"] for v in votes] == ["x"] and len(warnings) == 2
    assert read_votes(tmp_path / "none.jsonl") == ([], [])


def test_the_adapter_identity_is_dvc_locks_hash_of_the_adapters(tmp_path):
    assert weights_identity(tmp_path)["adapters"] is None
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: metrics/train.json\n      md5: 1\n"
        "    - path: models/adapters\n      hash: md5\n      md5: c89e.dir\n")
    assert weights_identity(tmp_path)["adapters"] == "c89e.dir"


def test_read_votes_waits_for_a_vote_being_written(tmp_path):
    """A reader takes append_vote's lock: a vote half-way through its write (here held there
    by the test, as a slow disk or a big vote would) is read whole, never as a torn line."""
    path = tmp_path / "votes.jsonl"
    append_vote(path, vote(1))
    line = (json.dumps(vote(2)) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    got = {}
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what append_vote holds while it writes
        os.write(fd, line[:100])
        reader = threading.Thread(target=lambda: got.update(result=read_votes(path)))
        reader.start()
        reader.join(3)  # the old reader is done by now, with a torn line; a locked one waits
        os.write(fd, line[100:])
    finally:
        os.close(fd)  # releases the lock
    reader.join(30)
    votes, warnings = got["result"]
    assert warnings == [] and [v["battle_id"] for v in votes] == ["0-1", "0-2"]


WEIGHTS = {"base": "b45e.dir", "adapters": "c89e.dir", "fused": "f05e.dir",
           "preference_adapters": "d90a.dir"}


def test_the_weights_identity_is_dvc_locks_hash_of_every_weight_file(tmp_path):

    assert weights_identity(tmp_path) == dict.fromkeys(WEIGHTS)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  base_model:\n    outs:\n    - path: models/base\n      md5: b45e.dir\n"
        "  train:\n    outs:\n    - path: models/adapters\n      md5: c89e.dir\n"
        "  fuse:\n    outs:\n    - path: models/fused\n      md5: f05e.dir\n"
        "  preference:\n    outs:\n    - path: models/preference_adapters\n      md5: d90a.dir\n")
    assert weights_identity(tmp_path) == WEIGHTS
    assert weights_identity(tmp_path)["adapters"] == "c89e.dir"


def test_a_vote_counts_only_for_the_weights_that_made_both_its_answers():
    from voicetune.data.votes import battle_weights, weights_match

    def judged(a, b, **changed):
        return {"model_a": a, "model_b": b, "vote": "A",
                "weights": battle_weights([a, b], {**WEIGHTS, **changed})}

    assert battle_weights(["dpo", "lora"], WEIGHTS) == WEIGHTS  # every file behind the two
    assert battle_weights(["base", "lora"], WEIGHTS) == {"base": "b45e.dir", "adapters": "c89e.dir"}
    assert weights_match(judged("dpo", "lora"), WEIGHTS)
    assert not weights_match(judged("dpo", "lora", preference_adapters="old.dir"), WEIGHTS)  # another DPO round
    assert not weights_match(judged("lora", "base", base="old.dir"), WEIGHTS)  # another base model
    assert not weights_match(judged("fused", "base", fused="old.dir"), WEIGHTS)
    assert weights_match(judged("lora", "base", preference_adapters="old.dir"), WEIGHTS)  # not behind it
    assert not weights_match(judged("lora", "base"), {**WEIGHTS, "adapters": None})  # unknown now
    assert not weights_match(judged("lora", "base", adapters=None), WEIGHTS)  # unknown then (--no-check)
    # schema 1 recorded the adapters only: the SFT adapter, and the preference one for dpo
    old = {"model_a": "dpo", "model_b": "lora", "vote": "A", "adapter": "c89e.dir",
           "preference_adapter": "old.dir"}
    assert not weights_match(old, WEIGHTS)
    assert weights_match({**old, "preference_adapter": "d90a.dir"}, WEIGHTS)
    assert weights_match({**old, "model_a": "base", "preference_adapter": None}, WEIGHTS)


def test_the_models_weights_are_the_ones_the_chat_loads():
    from voicetune.models.loader import ChatModels
    from voicetune.models.registry import NAMES, RECIPES, STAGES

    assert set(votes_module.MADE_OF) == set(NAMES)
    for name, (weights, adapters) in RECIPES.items():
        assert votes_module.MADE_OF[name] == (weights, *([adapters] if adapters else []))
    paths = ChatModels(check=False).paths
    assert votes_module.WEIGHTS == {w: (STAGES[w], paths[w].as_posix()) for w in STAGES}
