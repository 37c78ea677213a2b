"""JSON Lines, the project's row format: one reader and one writer for every file of rows.

The one error policy: a problem is named ``file:line: what``; every problem of a file is
collected before anything is raised, so a user fixes them all in one pass (``JsonlError``
lists them). A row's own checks (``check``) report in the same list. Blank lines are
skipped. Files that a killed writer may leave with a torn last line (the arena's votes)
read with ``skip_bad=True``: bad lines are then returned as warnings instead of raised.

``write_jsonl`` is atomic: the rows go to a temporary file beside the target, which
replaces it in one ``os.replace``; a failure leaves the old file as it was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from voicetune.core.errors import UserError
from voicetune.core.files import atomic_file

MAX_SHOWN = 20  # problems listed in one message; the count says how many more there are


class JsonlError(UserError, ValueError):
    """Every problem of one file, each as ``file:line: what``."""

    def __init__(self, problems: list[str], header: str | None = None):
        self.problems = list(problems)
        shown = self.problems[:MAX_SHOWN]
        more = len(self.problems) - len(shown)
        if header is None and len(self.problems) > 1:
            header = f"{len(self.problems)} problems"  # never a message that starts indented
        lines = ([header + ":"] if header else []) + [f"  {p}" for p in shown]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines) if header else shown[0])


BOM = b"\xef\xbb\xbf"  # some Windows editors start UTF-8 files with it; it is no data


def decoded_lines(path: str | Path, data: bytes) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, problem)`` per line of ``data``: exactly one of ``text`` and
    ``problem`` is set (a line that is not UTF-8). Lines are split on b"\\n" only, as editors
    number them; a leading BOM and the \\r of CRLF files are dropped, so that columns in
    messages are the ones an editor shows."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            yield number, raw.decode("utf-8").removesuffix("\r"), None
        except UnicodeDecodeError as err:
            # the column an editor shows: characters before the bad byte (they decode), plus one
            column = len(raw[:err.start].decode("utf-8")) + 1
            yield number, None, (f"{path}:{number}: not UTF-8: byte 0x{raw[err.start]:02x} at "
                                 f"column {column}; save the file as UTF-8")


def iter_jsonl(path: str | Path, data: bytes | None = None) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(where, row, problem)`` per non-blank line: ``where`` is ``file:line``; exactly one
    of ``row`` (a JSON object) and ``problem`` is set. ``data``: the file's bytes, read already
    (under a lock, say)."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    for number, line, problem in decoded_lines(path, data):
        where = f"{path}:{number}"
        if problem is not None:
            yield where, None, problem
            continue
        if not line.strip():
            continue
        try:
            # parsed without its line break, so an error at the end of a cut-short line is at
            # the end of this line (with it, json reports "line 2, column 1")
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield where, None, f"{where}: malformed JSON: {err.msg} (column {err.colno})"
            continue
        if not isinstance(row, dict):
            yield where, None, f"{where}: expected a JSON object, got {type(row).__name__}"
            continue
        yield where, row, None


def read_jsonl(path: str | Path, check: Callable[[dict], str | None] | None = None, *,
               missing: str | None = None, header: str | None = None, skip_bad: bool = False,
               data: bytes | None = None) -> list[dict] | tuple[list[dict], list[str]]:
    """The rows of a JSONL file, each a JSON object for which ``check(row)`` (if given)
    returns no problem.

    ``missing``: how to make the file, said when it does not exist (``None``: a missing
    file has no rows). ``header``: the first line of the error. ``skip_bad``: return
    ``(rows, warnings)`` with the bad lines skipped, instead of raising ``JsonlError``.
    """
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if missing is None:
                return ([], []) if skip_bad else []
            raise JsonlError([f"{path}: not found; {missing}"]) from None
        except IsADirectoryError:
            raise JsonlError([f"{path}: a folder, not a JSONL file"]) from None
    rows, problems = [], []
    for where, row, problem in iter_jsonl(path, data):
        if problem is None and check is not None and (bad := check(row)):
            problem = f"{where}: {bad}"
        if problem is None:
            rows.append(row)
        else:
            problems.append(problem)
    if skip_bad:
        return rows, problems
    if problems:
        raise JsonlError(problems, header)
    return rows


def dumps_jsonl(rows: Iterable[dict]) -> str:
    """The rows as JSON Lines text, unicode kept as it is (stable bytes for DVC's hashes)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` to ``path`` atomically (streamed to a temporary file, then one
    ``os.replace``): a failure midway leaves the old file, or none, never a part."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
