"""Reading, validating and splitting Q&A data: every bad input gets a precise error."""
import json

import pytest

from voicetune.dataset import (DataError, check_split_sizes, drop_duplicate_questions,
                               load_exchanges, split)

from .conftest import SHARED, qa, write_jsonl

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
    kept, notes = drop_duplicate_questions(exchanges)
    assert [e.assistant for e in kept] == ["Answer 1. A bowline, every time.", "Answer 2. A bowline, every time."]
    assert len(notes) == 1 and "data.jsonl:3: duplicate question (first at" in notes[0]


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


@pytest.mark.skipif(not (SHARED / "datasets/blog-qa/blog_qa.jsonl").exists(),
                    reason="needs ../shared (developer machines and CI)")
def test_seed_blog_dataset_splits_like_the_seed():
    exchanges = load_exchanges([SHARED / "datasets/blog-qa/blog_qa.jsonl"], forbidden=SPECIALS)
    kept, _ = drop_duplicate_questions(exchanges)
    parts = split(kept, seed=42, valid_ratio=0.1, test_ratio=0.1)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1705, "valid": 212, "test": 212}


def test_hub_dataset_needs_a_revision_and_fails_fast_offline(tmp_path, monkeypatch):
    from voicetune.dataset import download_hub_dataset

    with pytest.raises(DataError, match="needs data.hub_revision pinned"):
        download_hub_dataset("didierlopes/my-blog-qa-dataset", None, tmp_path)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not download dataset 'didierlopes/my-blog-qa-dataset'.*"
                                        "set data.source to the local"):
        download_hub_dataset("didierlopes/my-blog-qa-dataset", "main", tmp_path)
