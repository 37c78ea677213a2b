"""voicetune.core.jsonl: one reader and one writer of JSON Lines, one error policy
(``file:line: what``, every problem at once), writes atomic."""
import json
import os

import pytest

from voicetune.core.errors import UserError
from voicetune.core.jsonl import JsonlError, iter_jsonl, read_jsonl, write_jsonl


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_rows_in_file_order_blank_lines_skipped_bom_and_crlf_dropped(tmp_path):
    path = write(tmp_path / "rows.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n\r\n  \n{"a": "\xc3\xa9"}\r\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}]


def test_every_problem_at_once_each_with_file_and_line(tmp_path):
    """A wrong reader that stops at the first problem, or counts lines without the blank ones,
    fails here: four problems on lines 2, 4, 5 and 7, in order, the good rows unaffected."""
    path = write(tmp_path / "rows.jsonl",
                 b'{"a": 1}\n{"a": \n\n[1, 2]\n"text"\n{"a": 2}\n{"a": 3, \r\n')
    with pytest.raises(JsonlError) as err:
        read_jsonl(path)
    assert err.value.problems == [
        f"{path}:2: malformed JSON: Expecting value (column 7)",
        f"{path}:4: expected a JSON object, got list",
        f"{path}:5: expected a JSON object, got str",
        # the \r of CRLF is no column: the error is where an editor shows the line's end
        f"{path}:7: malformed JSON: Expecting property name enclosed in double quotes (column 10)",
    ]
    text = str(err.value)
    assert text.startswith("4 problems:\n") and all(p in text for p in err.value.problems)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_a_header_opens_the_message_and_one_problem_is_the_message(tmp_path):
    path = write(tmp_path / "rows.jsonl", b'{"a": 1}\n{"a"\n')
    with pytest.raises(JsonlError) as err:
        read_jsonl(path)
    assert str(err.value) == f"{path}:2: malformed JSON: Expecting ':' delimiter (column 5)"
    with pytest.raises(JsonlError) as err:
        read_jsonl(path, header="bad predictions")
    assert str(err.value) == f"bad predictions:\n  {path}:2: malformed JSON: Expecting ':' delimiter (column 5)"


def test_many_problems_are_all_kept_and_the_message_counts_the_rest(tmp_path):
    path = write(tmp_path / "rows.jsonl", b"x\n" * 25)
    with pytest.raises(JsonlError) as err:
        read_jsonl(path)
    assert len(err.value.problems) == 25 and f"{path}:25:" in err.value.problems[-1]
    assert str(err.value).endswith("  ... and 5 more") and f"{path}:21:" not in str(err.value)


def test_a_check_callbacks_problems_join_the_same_list_in_line_order(tmp_path):
    path = write(tmp_path / "rows.jsonl", b'{"q": "a"}\n{"q": 3}\nnot json\n{}\n{"q": "b"}\n')

    def check(row):
        if "q" not in row:
            return "no field 'q'"
        if not isinstance(row["q"], str):
            return f"field 'q' must be a string, got {type(row['q']).__name__}"
        return None

    with pytest.raises(JsonlError) as err:
        read_jsonl(path, check)
    assert err.value.problems == [f"{path}:2: field 'q' must be a string, got int",
                                  f"{path}:3: malformed JSON: Expecting value (column 1)",
                                  f"{path}:4: no field 'q'"]
    # the check sees only rows that parsed, and passing rows are returned as they are
    seen = []
    write(tmp_path / "ok.jsonl", b'{"q": "a"}\n{"q": "b"}\n')
    assert read_jsonl(tmp_path / "ok.jsonl", lambda row: seen.append(row)) == [{"q": "a"}, {"q": "b"}]
    assert seen == [{"q": "a"}, {"q": "b"}]


def test_a_missing_file_has_no_rows_unless_missing_says_how_to_make_it(tmp_path):
    path = tmp_path / "absent.jsonl"
    assert read_jsonl(path) == []
    assert read_jsonl(path, skip_bad=True) == ([], [])
    with pytest.raises(JsonlError) as err:
        read_jsonl(path, missing="the evaluate stage writes it (dvc repro evaluate)")
    assert str(err.value) == f"{path}: not found; the evaluate stage writes it (dvc repro evaluate)"
    with pytest.raises(JsonlError, match="a folder, not a JSONL file"):
        read_jsonl(tmp_path)


def test_skip_bad_returns_the_whole_rows_and_a_warning_for_a_torn_last_line(tmp_path):
    """A writer killed mid-row: every row before it is kept, the torn one is a warning, and
    nothing is raised, even with a check that refuses it."""
    path = write(tmp_path / "votes.jsonl", b'{"vote": "A"}\n{"x": 1}\n{"vote": "B"}\n{"vote": "A", "qu')
    rows, warnings = read_jsonl(path, lambda row: None if "vote" in row else "no vote", skip_bad=True)
    assert rows == [{"vote": "A"}, {"vote": "B"}]
    assert warnings == [f"{path}:2: no vote",
                        f"{path}:4: malformed JSON: Unterminated string starting at (column 15)"]


def test_a_line_that_is_not_utf8_is_named_with_its_byte_and_column_and_the_rest_read(tmp_path):
    path = write(tmp_path / "rows.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n{"a": 2}\n')
    rows, warnings = read_jsonl(path, skip_bad=True)
    assert rows == [{"a": 1}, {"a": 2}]
    assert warnings == [f"{path}:2: not UTF-8: byte 0xe9 at column 11; save the file as UTF-8"]


def test_data_read_already_is_parsed_instead_of_the_file(tmp_path):
    """The votes are read under a lock: the bytes given are what counts, not the file now."""
    path = write(tmp_path / "rows.jsonl", b'{"a": "on disk"}\n')
    assert read_jsonl(path, data=b'{"a": "locked"}\n') == [{"a": "locked"}]
    assert list(iter_jsonl(path, b'\n{"a": 1}\n[]\n')) == [
        (f"{path}:2", {"a": 1}, None), (f"{path}:3", None, f"{path}:3: expected a JSON object, got list")]
    # no such file, but data given: nothing is read from the disk
    assert read_jsonl(tmp_path / "absent.jsonl", data=b'{"a": 1}\n', missing="never said") == [{"a": 1}]


def test_write_jsonl_writes_one_utf8_line_per_row_unicode_kept(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"  # the folder is made
    rows = [{"q": "café ☕", "n": 1}, {"q": "line\nbreak"}]
    write_jsonl(path, rows)
    assert path.read_bytes() == ('{"q": "café ☕", "n": 1}\n{"q": "line\\nbreak"}\n').encode("utf-8")
    assert read_jsonl(path) == rows
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # not mkstemp's private 0o600
    write_jsonl(path, [])
    assert path.read_bytes() == b""


def test_a_failure_midway_leaves_the_old_file_intact_and_no_temporary_file(tmp_path):
    """An unserialisable row after good ones: the old rows stay, byte for byte, and no
    half-written file or temporary file is left; a wrong writer that writes in place, or
    forgets its temporary file, fails here."""
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"old": 1}, {"old": 2}])
    before = path.read_bytes()

    def rows():
        yield {"new": 1}
        yield {"new": 2}
        yield {"new": object()}  # not JSON
        yield {"new": 4}

    with pytest.raises(TypeError):
        write_jsonl(path, rows())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]

    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "fresh.jsonl", [{"a": 1}, {"b": {1, 2}}])
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]  # a new file is not made at all


def test_an_interrupt_while_writing_also_leaves_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"old": 1}])

    def rows():
        yield {"new": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, rows())
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["rows.jsonl"]
