"""Question/answer data: reading the accepted shapes, validating them, splitting them.

Accepted row shapes (one JSON object per JSONL line, or a JSON list of objects):
    {"conversation": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
    {"messages": [...same...]}
    {"question": ..., "answer": ...}
    {"prompt": ..., "completion": ...}
A multi-turn conversation yields one sample per user->assistant exchange (as the seed did);
system messages in the data are dropped, since every sample gets the persona prompt.
Every problem is reported with file, line and field, all at once, before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

ROLES = ("system", "user", "assistant")
SHAPES = (
    '{"conversation": [{"role", "content"}, ...]}',
    '{"messages": [...]}',
    '{"question", "answer"}',
    '{"prompt", "completion"}',
)
MAX_REPORTED = 20


class DataError(UserError, ValueError):
    """Bad input data; the message lists every problem found (up to MAX_REPORTED)."""

    def __init__(self, problems: list[str], header: str = "invalid dataset"):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        text = f"{header} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


@dataclass(frozen=True)
class Exchange:
    """One user question and the author's answer."""

    user: str
    assistant: str
    where: str  # "file:line" of the row it came from
    group: int  # index of the source row (conversation), for grouped splits


def read_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (location, parsed JSON value) for each row of a .jsonl or .json file."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such file"], header="cannot read the dataset")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError([f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"])
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[row {i}]", row
        return
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError([f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})"])
        if not isinstance(rows, list):
            raise DataError([f"{path}: a .json dataset must be a list of objects; "
                             "for one object per line use .jsonl"])
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row
        return
    bad = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(f"{path}:{lineno}: malformed JSON: {err.msg} (column {err.colno})")
    if bad:
        raise DataError(bad)


def _messages(row: dict) -> tuple[str, list] | None:
    for key in ("conversation", "messages"):
        if key in row:
            return key, row[key]
    for q, a in (("question", "answer"), ("prompt", "completion")):
        if q in row or a in row:
            return "", [{"role": "user", "content": row.get(q), "_field": q},
                        {"role": "assistant", "content": row.get(a), "_field": a}]
    return None


def exchanges_from_row(row: object, where: str, group: int, forbidden: Iterable[str] = ()
                       ) -> tuple[list[Exchange], list[str]]:
    """Split one row into exchanges; return them with the problems found (never raises)."""
    if not isinstance(row, dict):
        return [], [f"{where}: expected a JSON object, got {type(row).__name__}"]
    found = _messages(row)
    if found is None:
        return [], [f"{where}: unrecognised row with keys {sorted(row)}; accepted shapes: "
                    + ", ".join(SHAPES)]
    key, messages = found
    if not isinstance(messages, list) or not messages:
        return [], [f"{where}: field '{key}' must be a non-empty list of messages"]
    problems, turns = [], []
    for i, msg in enumerate(messages):
        field = msg.get("_field") if isinstance(msg, dict) and "_field" in msg else f"{key}[{i}]"
        if not isinstance(msg, dict):
            problems.append(f"{where}: field '{field}' must be an object with role and content")
            continue
        role, content = msg.get("role"), msg.get("content")
        role_field = field if "_field" in msg else f"{field}.role"
        content_field = field if "_field" in msg else f"{field}.content"
        if role is None:
            problems.append(f"{where}: field '{role_field}' is missing (one of {', '.join(ROLES)})")
            continue
        if role not in ROLES:
            problems.append(f"{where}: field '{role_field}': unknown role {role!r} "
                            f"(expected one of {', '.join(ROLES)})")
            continue
        if content is None:
            problems.append(f"{where}: field '{content_field}' is missing")
            continue
        if not isinstance(content, str):
            problems.append(f"{where}: field '{content_field}' must be a string, "
                            f"got {type(content).__name__}")
            continue
        if not content.strip():
            problems.append(f"{where}: field '{content_field}' is empty")
            continue
        hits = [tok for tok in forbidden if tok in content]
        if hits:
            problems.append(f"{where}: field '{content_field}' contains the special token "
                            f"{hits[0]!r}, which would corrupt the chat format; remove or reword it")
            continue
        if role != "system":
            turns.append((role, content, field))
    exchanges = []
    if not problems:
        for j in range(0, len(turns), 2):
            pair = turns[j:j + 2]
            roles = [r for r, _, _ in pair]
            if roles != ["user", "assistant"]:
                field = pair[-1][2]
                problems.append(f"{where}: field '{field}': expected a user message followed by an "
                                f"assistant answer, got {' then '.join(roles)}")
                break
            exchanges.append(Exchange(pair[0][1], pair[1][1], where, group))
    return exchanges, problems


def load_exchanges(paths: Iterable[str | Path], forbidden: Iterable[str] = ()) -> list[Exchange]:
    forbidden = list(forbidden)
    exchanges, problems, group = [], [], 0
    for path in paths:
        for where, row in read_rows(path):
            found, bad = exchanges_from_row(row, where, group, forbidden)
            exchanges += found
            problems += bad
            group += 1
    if problems:
        raise DataError(problems)
    if not exchanges:
        raise DataError([f"{', '.join(map(str, paths))}: no question/answer pairs found"],
                        header="empty dataset")
    return exchanges


def _question_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def drop_duplicate_questions(exchanges: list[Exchange]) -> tuple[list[Exchange], list[str]]:
    """Keep the first answer to each question (case and whitespace ignored); report the rest."""
    first: dict[str, Exchange] = {}
    kept, notes = [], []
    for ex in exchanges:
        key = _question_key(ex.user)
        if key in first:
            notes.append(f"{ex.where}: duplicate question (first at {first[key].where}), dropped")
        else:
            first[key] = ex
            kept.append(ex)
    return kept, notes


def _seeded_order(n: int, seed: int) -> list[int]:
    """A seeded shuffle of range(n) that depends on nothing but (seed, index):
    the same split on every Python/numpy version and platform."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def split(exchanges: list[Exchange], seed: int, valid_ratio: float, test_ratio: float,
          by: str = "exchange") -> dict[str, list[Exchange]]:
    """Seeded 3-way split: test = floor(test_ratio*n), valid = floor(valid_ratio*n), train = rest.

    With ``by="conversation"`` whole source rows go to one split (the exchanges of one post
    never straddle splits); test and valid are then filled to at least their target size.
    """
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise ValueError(f"data.valid_ratio={valid_ratio} and data.test_ratio={test_ratio} "
                         "must be in [0, 1) and sum to less than 1")
    n = len(exchanges)
    n_test, n_valid = math.floor(test_ratio * n), math.floor(valid_ratio * n)
    if by == "exchange":
        order = [exchanges[i] for i in _seeded_order(n, seed)]
        return {"train": order[n_test + n_valid:], "valid": order[n_test:n_test + n_valid],
                "test": order[:n_test]}
    if by != "conversation":
        raise ValueError(f"data.split_by must be 'exchange' or 'conversation', got {by!r}")
    groups: dict[int, list[Exchange]] = {}
    for ex in exchanges:
        groups.setdefault(ex.group, []).append(ex)
    keys = sorted(groups)
    out = {"test": [], "valid": [], "train": []}
    for i in _seeded_order(len(keys), seed):
        members = groups[keys[i]]
        name = ("test" if len(out["test"]) < n_test
                else "valid" if len(out["valid"]) < n_valid else "train")
        out[name] += members
    return {name: out[name] for name in ("train", "valid", "test")}


def check_split_sizes(splits: dict[str, list], batch_size: int) -> None:
    small = [f"split '{name}' has {len(rows)} samples, fewer than train.batch_size={batch_size}"
             for name, rows in splits.items() if len(rows) < batch_size]
    if small:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in splits.items())
        raise DataError(small + [f"(split sizes: {sizes}) add data, lower train.batch_size, or "
                                 "raise data.valid_ratio / data.test_ratio"],
                        header="dataset too small for the batch size")


def to_messages(ex: Exchange, system_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": ex.user},
            {"role": "assistant", "content": ex.assistant}]


def length_summary(lengths: list[int], max_seq_length: int) -> dict:
    ordered = sorted(lengths)

    def pct(q):  # nearest-rank percentile: always a length that occurs
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else 0

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1] if ordered else 0,
            "over_max_seq_length": sum(1 for x in lengths if x > max_seq_length)}


def source_files(source: str | Path) -> list[Path]:
    """A dataset file, or every .jsonl/.json file of a folder (sorted, for a stable order)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError([f"{source}: folder holds no .jsonl or .json files"],
                            header="cannot read the dataset")
        return files
    return [source]


def download_hub_dataset(repo_id: str, revision: str | None, dest: Path) -> list[Path]:
    """Fetch a Hugging Face dataset repo's data files (JSONL/JSON/Parquet) into ``dest``."""
    if not revision:
        raise DataError([f"data.hub_dataset {repo_id!r} needs data.hub_revision pinned to a "
                         f"commit hash (see https://huggingface.co/datasets/{repo_id}/commits/main)"],
                        header="unpinned hub dataset")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    print(f"downloading dataset {repo_id}@{revision} from the Hugging Face hub ...")
    try:
        snapshot_download(repo_id, repo_type="dataset", revision=revision, local_dir=dest,
                          allow_patterns=["*.jsonl", "*.json", "*.parquet"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise DataError([f"could not download dataset {repo_id!r} ({type(err).__name__}: {err}). "
                         "Offline? Download it elsewhere, then set data.source to the local "
                         "JSONL file and data.hub_dataset to null"], header="hub dataset unavailable")
    files = sorted(p for p in Path(dest).rglob("*")
                   if p.suffix in (".jsonl", ".json", ".parquet") and ".cache" not in p.parts)
    if not files:
        raise DataError([f"dataset {repo_id!r} has no JSONL, JSON or Parquet files"])
    return files
