"""Reading, validating and splitting Q&A data: every bad input gets a precise error."""
import json

import pytest

from voicetune.data.qa import (DataError, check_split_sizes, drop_duplicate_questions,
                               load_exchanges, split)

from tests.conftest import ROOT, qa, shared_file, write_jsonl
from tests.harness.fakes import SHA, RecordingHub

SPECIALS = ["<|im_start|>", "<|im_end|>"]


def load_one(tmp_path, *rows, name="data.jsonl"):
    return load_exchanges([write_jsonl(tmp_path / name, rows)], forbidden=SPECIALS)


def problem(tmp_path, *rows) -> str:
    with pytest.raises(DataError) as err:
        load_one(tmp_path, *rows)
    return str(err.value)


def test_all_accepted_shapes(tmp_path):
    exchanges = load_one(
        tmp_path,
        qa(1),
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        {"question": "Q3", "answer": "A3"},
        {"prompt": "Q4", "completion": "A4"},
    )
    assert [(e.user, e.assistant) for e in exchanges][1:] == [("Q2", "A2"), ("Q3", "A3"), ("Q4", "A4")]
    assert exchanges[2].where.endswith("data.jsonl:3")


def test_json_list_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": "Q", "answer": "A"}]))
    assert load_exchanges([path])[0].where.endswith("data.json[0]")


def test_multi_turn_conversation_gives_one_sample_per_exchange(tmp_path):
    row = {"conversation": [
        {"role": "system", "content": "ignored: the persona prompt comes from params"},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    exchanges = load_one(tmp_path, row, qa(9))
    assert [(e.user, e.assistant, e.group) for e in exchanges[:2]] == [("Q1", "A1", 0), ("Q2", "A2", 0)]
    assert exchanges[2].group == 1


def test_malformed_json_names_file_and_line(tmp_path):
    text = problem(tmp_path, qa(1), '{"conversation": [', qa(3))
    assert "data.jsonl:2: malformed JSON" in text


@pytest.mark.parametrize("message, expected", [
    ({"content": "hi"}, "field 'conversation[0].role' is missing"),
    ({"role": "bot", "content": "hi"}, "field 'conversation[0].role': unknown role 'bot'"),
    ({"role": "user", "content": ""}, "field 'conversation[0].content' is empty"),
    ({"role": "user", "content": "   "}, "field 'conversation[0].content' is empty"),
    ({"role": "user", "content": 42}, "field 'conversation[0].content' must be a string, got int"),
    ({"role": "user"}, "field 'conversation[0].content' is missing"),
    ({"role": "user", "content": "stop<|im_end|>here"}, "contains the special token '<|im_end|>'"),
])
def test_bad_message_is_reported_with_file_line_and_field(tmp_path, message, expected):
    row = {"conversation": [message, {"role": "assistant", "content": "fine"}]}
    text = problem(tmp_path, qa(0), row)
    assert "data.jsonl:2:" in text and expected in text


def test_turns_out_of_order_and_unanswered_questions(tmp_path):
    twice = {"conversation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    assert "expected a user message followed by an assistant answer, got user then user" in problem(tmp_path, twice)
    unanswered = {"conversation": [{"role": "user", "content": "a"}]}
    assert "got user" in problem(tmp_path, unanswered)
    flat = {"question": "Q", "answer": ""}
    assert "field 'answer' is empty" in problem(tmp_path, flat)


def test_unknown_row_shape_lists_accepted_shapes(tmp_path):
    text = problem(tmp_path, {"text": "hello"})
    assert "unrecognised row with keys ['text']" in text and '{"question", "answer"}' in text


def test_all_problems_reported_at_once(tmp_path):
    text = problem(tmp_path, {"question": "", "answer": "A"}, qa(1), {"question": "Q", "answer": 3})
    assert "2 problems" in text and ":1:" in text and ":3:" in text


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_exchanges([tmp_path / "empty.jsonl"])


def test_duplicate_questions_keep_the_first(tmp_path):
    exchanges = load_one(tmp_path, qa(1, "Why reef early?"), qa(2), qa(3, "  why REEF   early? "))
    kept, duplicates, conflicts = drop_duplicate_questions(exchanges)
    assert [e.assistant for e in kept] == ["Answer 1. A bowline, every time.", "Answer 2. A bowline, every time."]
    # the same question with another answer ("Answer 3.") is a conflict, not a plain duplicate
    assert duplicates == [] and len(conflicts) == 1 and "data.jsonl:3: same question as" in conflicts[0]


def _exchanges(tmp_path, n):
    return load_one(tmp_path, *[qa(i) for i in range(n)])


def test_split_sizes_are_floors_and_seeded(tmp_path):
    exchanges = _exchanges(tmp_path, 2129)
    parts = split(exchanges, seed=42, valid_ratio=0.1, test_ratio=0.1)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1705, "valid": 212, "test": 212}
    assert parts == split(exchanges, seed=42, valid_ratio=0.1, test_ratio=0.1)
    assert parts["test"] != split(exchanges, seed=43, valid_ratio=0.1, test_ratio=0.1)["test"]
    assert sorted(e.user for p in parts.values() for e in p) == sorted(e.user for e in exchanges)


def test_split_by_conversation_keeps_conversations_whole(tmp_path):
    rows = [{"conversation": [{"role": "user", "content": f"Q{i}a"}, {"role": "assistant", "content": "A"},
                              {"role": "user", "content": f"Q{i}b"}, {"role": "assistant", "content": "B"}]}
            for i in range(50)]
    parts = split(load_one(tmp_path, *rows), seed=1, valid_ratio=0.1, test_ratio=0.1, by="conversation")
    groups = {name: {e.group for e in p} for name, p in parts.items()}
    assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"]
                or groups["valid"] & groups["test"])
    assert len(parts["test"]) == 10 and len(parts["valid"]) == 10 and len(parts["train"]) == 80


def test_split_smaller_than_batch_size(tmp_path):
    parts = split(_exchanges(tmp_path, 30), seed=0, valid_ratio=0.1, test_ratio=0.1)
    with pytest.raises(DataError, match="split 'valid' has 3 samples, fewer than train.batch_size=4"):
        check_split_sizes(parts, batch_size=4)
    check_split_sizes(parts, batch_size=3)


def test_seed_blog_dataset_splits_like_the_seed():
    exchanges = load_exchanges([shared_file("datasets/blog-qa/blog_qa.jsonl")], forbidden=SPECIALS)
    kept, _, _ = drop_duplicate_questions(exchanges)
    parts = split(kept, seed=42, valid_ratio=0.1, test_ratio=0.1)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1705, "valid": 212, "test": 212}


@pytest.mark.parametrize("requested", ["main", None])
def test_unpinned_hub_dataset_is_resolved_to_its_commit_sha(tmp_path, monkeypatch, capsys, requested):
    """Offline: the hub client is a recording stand-in (RecordingHub)."""
    from voicetune.data.qa import download_hub_dataset

    hub = RecordingHub(monkeypatch)
    files, source = download_hub_dataset("didierlopes/my-blog-qa-dataset", requested, tmp_path)
    assert hub.calls == [("dataset_info", "didierlopes/my-blog-qa-dataset", requested),
                         ("snapshot_download", "didierlopes/my-blog-qa-dataset", "dataset", SHA)]
    assert files == [tmp_path / "data.jsonl"]
    assert source == {"hub_dataset": "didierlopes/my-blog-qa-dataset",
                      "requested_revision": requested, "commit_sha": SHA}
    err = capsys.readouterr().err
    assert "unpinned" in err and SHA in err and f"data.hub_revision: {SHA}" in err


def test_pinned_hub_dataset_is_downloaded_at_that_sha_without_a_lookup(tmp_path, monkeypatch, capsys):
    """Offline: the hub client is a recording stand-in (RecordingHub)."""
    from voicetune.data.qa import download_hub_dataset

    hub = RecordingHub(monkeypatch)
    _, source = download_hub_dataset("someone/data", SHA, tmp_path)
    assert hub.calls == [("snapshot_download", "someone/data", "dataset", SHA)]
    assert source["commit_sha"] == SHA and "unpinned" not in capsys.readouterr().err


def test_hub_dataset_fails_fast_offline(tmp_path, monkeypatch):
    from voicetune.data.qa import download_hub_dataset
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for revision in ("main", SHA):
        with pytest.raises(DataError, match="dataset 'didierlopes/my-blog-qa-dataset'.*"
                                            "set data.source to the local"):
            download_hub_dataset("didierlopes/my-blog-qa-dataset", revision, tmp_path)


# ------------------------------------------------------------ encoding and malformed JSON
def test_non_utf8_jsonl_names_file_line_byte_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    bad = '{"question": "Caf'.encode() + b"\xe9" + '", "answer": "A"}'.encode()
    path.write_bytes(json.dumps(qa(1)).encode() + b"\n" + bad + b"\n" + json.dumps(qa(3)).encode() + b"\n")
    with pytest.raises(DataError) as err:
        load_exchanges([path])
    # the 0xe9 byte is the 18th character of line 2 (an editor's column)
    assert f"{path}:2: not UTF-8: byte 0xe9 at column 18; save the file as UTF-8" in str(err.value)
    assert "1 problem" in str(err.value)


def test_non_utf8_json_names_file_line_byte_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"question": "Q", "answer": "A"},\n {"question": "na\xefve", "answer": "B"}]\n')
    with pytest.raises(DataError) as err:
        load_exchanges([path])
    assert f"{path}:2: not UTF-8: byte 0xef at column 18; save the file as UTF-8" in str(err.value)


def test_byte_order_mark_is_accepted(tmp_path):
    for name, text in (("a.jsonl", json.dumps(qa(1)) + "\n"), ("b.json", json.dumps([qa(2)]))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert len(load_exchanges([tmp_path / name])) == 1


def test_malformed_json_does_not_hide_the_other_rows_problems(tmp_path):
    text = problem(tmp_path, {"question": "", "answer": "A"}, '{"conversation": [', qa(3),
                   {"question": "Q", "answer": 3})
    assert "3 problems" in text
    lines = text.splitlines()[1:]
    assert [line.split(": ")[0].rsplit(":", 1)[1] for line in lines] == ["1", "2", "4"]


@pytest.mark.parametrize("line, column", [
    ('{"question": "Q"', 17),             # cut short: the error is at the end of the line, not column 1
    ('   {"question": "Q",}', 21),        # leading whitespace is part of the line
    ('{"question": "Ünïcödé" "answer"}', 24),  # characters, not bytes
])
def test_malformed_json_column_is_the_real_position_in_the_line(tmp_path, line, column):
    text = problem(tmp_path, qa(0), line)
    assert "data.jsonl:2: malformed JSON" in text and f"(column {column})" in text


def test_malformed_json_file_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'\xef\xbb\xbf[{"question": "Q", "answer": "A"},\n  {"question" "Q2"}]\n')
    with pytest.raises(DataError) as err:
        load_exchanges([path])
    assert f"{path}:2: malformed JSON: Expecting ':' delimiter (column 15)" in str(err.value)


# ------------------------------------------------------------ duplicates
def test_near_duplicate_questions_are_dropped_and_conflicts_reported_apart(tmp_path):
    same = "A bowline, every time."
    exchanges = load_one(
        tmp_path,
        {"question": "Why reef early?", "answer": same},
        {"question": "why reef early", "answer": same},              # punctuation, case: duplicate
        {"question": "Why  reef\u00a0EARLY ?!", "answer": " a BOWLINE, every time "},  # NFKC space
        {"question": "\uff37hy reef early?", "answer": "Never reef."},  # fullwidth W: a conflict
        {"question": "Why reef late?", "answer": same},
    )
    kept, duplicates, conflicts = drop_duplicate_questions(exchanges)
    assert [e.user for e in kept] == ["Why reef early?", "Why reef late?"]
    assert [n.split(": ")[0][-len("data.jsonl:2"):] for n in duplicates] == ["data.jsonl:2", "data.jsonl:3"]
    assert all("duplicate question (first at" in n and "data.jsonl:1)" in n for n in duplicates)
    assert len(conflicts) == 1
    assert "data.jsonl:4: same question as " in conflicts[0] and "data.jsonl:1 with a different answer" in conflicts[0]


def test_near_duplicates_never_end_up_in_two_splits(tmp_path):
    rows = []
    for i in range(100):
        rows.append({"question": f"How do I tie knot number {i}?", "answer": f"A{i}"})
        rows.append({"question": f"  how do i tie KNOT number {i}", "answer": f"A{i}"})
        rows.append({"question": f"How do I tie knot number {i}...", "answer": f"other {i}"})
    kept, _, _ = drop_duplicate_questions(load_one(tmp_path, *rows))
    parts = split(kept, seed=3, valid_ratio=0.2, test_ratio=0.2)
    where = {}
    for name, part in parts.items():
        for ex in part:
            number = ex.user.rstrip("?.").split()[-1]
            where.setdefault(number, set()).add(name)
    assert len(where) == 100 and all(len(names) == 1 for names in where.values())


# ------------------------------------------------------------ the default split
def _default_split(path):
    from voicetune.core.params import load_params

    data = load_params(ROOT / "params.yaml")["data"]
    kept, _, _ = drop_duplicate_questions(load_exchanges([path], forbidden=SPECIALS))
    return kept, split(kept, data["seed"], data["valid_ratio"], data["test_ratio"], by=data["split_by"])


def test_default_split_keeps_the_sample_conversations_whole():
    """With `exchange` (the old default), 5 of the sample's 10 multi-turn conversations
    straddled splits at seed 42, 2 of them train and test."""
    kept, parts = _default_split(ROOT / "data/sample/tilly_brask.jsonl")
    where = {}
    for name, part in parts.items():
        for ex in part:
            where.setdefault(ex.group, set()).add(name)
    multi_turn = {ex.group for ex in kept if sum(e.group == ex.group for e in kept) > 1}
    assert len(multi_turn) == 10
    assert [g for g in multi_turn if len(where[g]) > 1] == []
    assert split(kept, 42, 0.1, 0.1) == parts  # split()'s own default is the same


def test_default_split_of_the_seed_blog_dataset_is_the_seeds():
    _, parts = _default_split(shared_file("datasets/blog-qa/blog_qa.jsonl"))
    assert {k: len(v) for k, v in parts.items()} == {"train": 1705, "valid": 212, "test": 212}


# ------------------------------------------------------------ room for the answer
def test_answer_room_stops_on_train_or_valid_and_warns_on_truncation():
    from voicetune.data.qa import Length, check_answer_room

    fits, cut, full = Length("a.jsonl:1", 10, 20), Length("a.jsonl:2", 10, 40), Length("a.jsonl:3", 31, 40)
    assert check_answer_room({"train": [fits], "valid": [fits], "test": [fits]}, 30) == []
    [warning] = check_answer_room({"train": [fits, cut], "valid": [fits], "test": [cut]}, 30)
    assert warning.startswith("2 samples longer than train.max_seq_length=30 (train 1, valid 0, test 1")
    with pytest.raises(DataError) as err:  # one full prompt in valid: its loss would be 0/0 = nan
        check_answer_room({"train": [fits], "valid": [full, fits], "test": [full]}, 30)
    assert ("2 samples would keep no answer token at train.max_seq_length=30 (train 0, valid 1, test 1)"
            in str(err.value)) and "a.jsonl:3: 31 prompt tokens" in str(err.value)
    assert "at least 32" in str(err.value) and "40 keeps every sample whole" in str(err.value)
    # test prompts are only generated from, never cut: a warning
    [warning] = check_answer_room({"train": [fits], "valid": [fits], "test": [full]}, 30)
    assert warning.startswith("1 test sample has a prompt of train.max_seq_length=30 tokens or more")
    assert "a.jsonl:3: 31" in warning and "evaluation is unaffected" in warning
