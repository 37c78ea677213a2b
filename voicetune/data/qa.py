"""Question/answer data: reading the accepted shapes, validating them, splitting them.

Accepted row shapes (one JSON object per JSONL line, or a JSON list of objects):
    {"conversation": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
    {"messages": [...same...]}
    {"question": ..., "answer": ...}
    {"prompt": ..., "completion": ...}
A multi-turn conversation yields one sample per user->assistant exchange (as the seed did);
system messages in the data are dropped, since every sample gets the persona prompt.
Every problem is reported with file, line and field, all at once and in file order, before
anything is written: a malformed or non-UTF-8 line does not hide the other rows' problems.
Questions are de-duplicated after normalising case, punctuation, whitespace and Unicode forms,
so that one question never lands in two splits.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from voicetune.core.errors import UserError
from voicetune.core.jsonl import decoded_lines, iter_jsonl

ROLES = ("system", "user", "assistant")
TASKS = ("qa", "rewrite")  # a row's "task" (absent: qa)
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
    post: str | None = None  # the row's post_id (rows written by the ingest stage), for split_by post
    task: str = "qa"  # "rewrite": a plain draft -> the author's original (the rewrite stage's rows)


def read_rows(path: str | Path) -> Iterator[tuple[str, object, str | None]]:
    """Yield (location, parsed JSON value, problem) for each row of a .jsonl, .json or .parquet
    file, in file order; a row that cannot be read has value None and says why in problem.

    Rows that cannot be read do not stop the reading: the caller reports them together with
    every other row's problems.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such file"], header="cannot read the dataset")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError([f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"])
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[row {i}]", row, None
        return
    if path.suffix != ".json":
        # JSONL: the project's one reader, its problems in the same file:line form
        yield from iter_jsonl(path)
        return
    lines, undecodable = [], []
    for _, line, problem in decoded_lines(path, path.read_bytes()):
        lines.append(line)
        if problem:
            undecodable.append(problem)
    if undecodable:  # one document: nothing of it can be parsed
        for problem in undecodable:
            yield f"{path}", None, problem
        return
    try:
        rows = json.loads("\n".join(lines))
    except json.JSONDecodeError as err:
        yield f"{path}:{err.lineno}", None, (f"{path}:{err.lineno}: malformed JSON: {err.msg} "
                                            f"(column {err.colno})")
        return
    if not isinstance(rows, list):
        yield f"{path}", None, (f"{path}: a .json dataset must be a list of objects; "
                                "for one object per line use .jsonl")
        return
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row, None


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
    task = row.get("task", "qa")
    if task not in TASKS:
        problems.append(f"{where}: field 'task': got {task!r}; expected one of {', '.join(TASKS)}")
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
            post = row.get("post_id")
            exchanges.append(Exchange(pair[0][1], pair[1][1], where, group,
                                      post if isinstance(post, str) else None, task))
    return exchanges, problems


def load_exchanges(paths: Iterable[str | Path], forbidden: Iterable[str] = ()) -> list[Exchange]:
    forbidden = list(forbidden)
    exchanges, problems, group = [], [], 0
    for path in paths:
        for where, row, unreadable in read_rows(path):
            if unreadable:
                problems.append(unreadable)
                continue
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


def normalized(text: str) -> str:
    """The text as a duplicate check sees it: NFKC (full-width letters, non-breaking spaces and
    ligatures become plain ones), case-folded, punctuation removed, whitespace collapsed.

    "Why reef early?" and "  why REEF early" are one question: kept apart, the same question
    could land in train and in test and inflate the test score.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def drop_duplicate_questions(exchanges: list[Exchange]
                             ) -> tuple[list[Exchange], list[str], list[str]]:
    """Keep the first exchange of each question (compared ``normalized``); return the kept
    exchanges, the notes on dropped duplicates, and the notes on dropped conflicts (the same
    question with a different answer, also compared ``normalized``), which need a person's look.
    """
    first: dict[str, Exchange] = {}
    kept, duplicates, conflicts = [], [], []
    for ex in exchanges:
        key = normalized(ex.user)
        if key not in first:
            first[key] = ex
            kept.append(ex)
        elif normalized(ex.assistant) == normalized(first[key].assistant):
            duplicates.append(f"{ex.where}: duplicate question (first at {first[key].where}), dropped")
        else:
            conflicts.append(f"{ex.where}: same question as {first[key].where} with a different "
                             f"answer; kept the first, dropped this one (merge or reword them)")
    return kept, duplicates, conflicts


def seeded_order(n: int, seed: int) -> list[int]:
    """A seeded shuffle of range(n) that depends on nothing but (seed, index): the same split
    on every Python/numpy version and platform. Every seeded draw of the project's data (the
    splits here, preference pairs' sample and valid slice) takes a prefix of it."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def split(exchanges: list[Exchange], seed: int, valid_ratio: float, test_ratio: float,
          by: str = "conversation", at_least: int = 0) -> dict[str, list[Exchange]]:
    """Seeded 3-way split: test = floor(test_ratio*n), valid = floor(valid_ratio*n), train = rest.

    With ``by="conversation"`` (the default) whole source rows go to one split: the later
    exchanges of a conversation continue its earlier ones, so splitting them apart would test
    the model on what it trained on. Test and valid are then filled to at least their target
    size. ``by="post"`` does the same with every exchange of one post (the ``post_id`` of rows
    the ingest stage writes): questions about one post would otherwise be tested on answers
    trained from its other passages. ``by="exchange"`` shuffles the exchanges themselves.
    ``at_least``: test and valid get at least this many exchanges each (whole groups) when
    there are 3 groups or more: a small set split by post still tests something.
    """
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise ValueError(f"data.valid_ratio={valid_ratio} and data.test_ratio={test_ratio} "
                         "must be in [0, 1) and sum to less than 1")
    n = len(exchanges)
    n_test, n_valid = math.floor(test_ratio * n), math.floor(valid_ratio * n)
    if by == "exchange":
        order = [exchanges[i] for i in seeded_order(n, seed)]
        return {"train": order[n_test + n_valid:], "valid": order[n_test:n_test + n_valid],
                "test": order[:n_test]}
    if by not in ("conversation", "post"):
        raise ValueError(f"data.split_by must be 'exchange', 'conversation' or 'post', got {by!r}")
    if by == "post":
        lacking = [ex.where for ex in exchanges if ex.post is None]
        if lacking:
            raise DataError([f"{where}: no post_id (a string)" for where in lacking],
                            header="data.split_by is post, but rows lack the post_id that the "
                                   "ingest stage writes (use split_by: conversation for other data)")
    groups: dict = {}
    for ex in exchanges:
        groups.setdefault(ex.post if by == "post" else ex.group, []).append(ex)
    keys = sorted(groups)
    if len(keys) >= 3:
        n_test, n_valid = max(n_test, at_least), max(n_valid, at_least)
    out = {"test": [], "valid": [], "train": []}
    for i in seeded_order(len(keys), seed):
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


@dataclass(frozen=True)
class Length:
    """Token counts of one rendered sample."""

    where: str   # "file:line" of its source row
    prompt: int  # persona + question + the assistant header: what the loss masks out
    total: int   # the whole sample


def check_answer_room(lengths: dict[str, list[Length]], max_seq_length: int) -> list[str]:
    """Stop when a train or valid sample would keep no answer token once cut to max_seq_length;
    return warnings for the samples that are merely truncated (and for test prompts that fill it).

    Training keeps the first max_seq_length tokens and trains on the answer tokens among them:
    a prompt of max_seq_length tokens or more leaves none. A validation batch of such samples
    has a loss of 0/0 = nan, which used to stop training minutes later; a training batch of
    them teaches nothing. (Evaluation generates from the prompt and never cuts it.)
    """
    full = {name: [x for x in split_lengths if x.prompt >= max_seq_length]
            for name, split_lengths in lengths.items()}
    cut = {name: [x for x in split_lengths if x.prompt < max_seq_length < x.total]
           for name, split_lengths in lengths.items()}
    counts = lambda by_split: ", ".join(f"{name} {len(xs)}" for name, xs in by_split.items())
    longest_prompt = max((x for xs in full.values() for x in xs), key=lambda x: x.prompt, default=None)
    longest = max(x.total for xs in lengths.values() for x in xs) if lengths else 0
    warnings = []
    if longest_prompt:
        n = sum(map(len, full.values()))
        text = (f"{n} sample{'s' * (n != 1)} would keep no answer token at train.max_seq_length="
                f"{max_seq_length} ({counts(full)}): the persona and the question alone fill it "
                f"(e.g. {longest_prompt.where}: {longest_prompt.prompt} prompt tokens). Raise "
                f"train.max_seq_length to at least {longest_prompt.prompt + 1} (the longest such "
                f"prompt + 1 answer token; {longest} keeps every sample whole), or shorten "
                "data.system_prompt")
        if full["train"] or full["valid"]:
            raise DataError([text], header="prompts fill train.max_seq_length")
        warnings.append(f"{n} test sample{'s' * (n != 1)} ha{'ve' if n != 1 else 's'} a prompt of "
                        f"train.max_seq_length={max_seq_length} tokens or more (e.g. "
                        f"{longest_prompt.where}: {longest_prompt.prompt}); evaluation is unaffected, "
                        "but the model never trained on prompts that long")
    n = sum(map(len, cut.values()))
    if n:
        warnings.append(f"{n} sample{'s' * (n != 1)} longer than train.max_seq_length="
                        f"{max_seq_length} ({counts(cut)}; longest {longest} tokens) will be "
                        "truncated in training, keeping part of their answer")
    return warnings


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


def _hub_unavailable(repo_id: str, err: Exception) -> DataError:
    return DataError([f"could not download dataset {repo_id!r} ({type(err).__name__}: {err}). "
                      "Offline? Download it elsewhere, then set data.source to the local "
                      "JSONL file and data.hub_dataset to null"], header="hub dataset unavailable")


def is_commit_sha(revision: str | None) -> bool:
    """A full commit hash: the only revision that names the same files forever (a branch
    moves, and the hub API refuses the short shas its web pages show)."""
    return bool(revision) and re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def download_hub_dataset(repo_id: str, revision: str | None, dest: Path) -> tuple[list[Path], dict]:
    """Fetch a Hugging Face dataset repo's data files (JSONL/JSON/Parquet) into ``dest``.

    An unpinned ``revision`` (a branch or tag such as ``main``, or None) is resolved to its
    commit sha first, with a warning, and exactly that sha is downloaded. Returns the files and
    the record of what was read: hub_dataset, requested_revision, commit_sha.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    sha = revision
    if not is_commit_sha(revision):
        try:
            sha = HfApi().dataset_info(repo_id, revision=revision).sha
        except (HfHubHTTPError, OSError) as err:
            raise _hub_unavailable(repo_id, err)
        print(f"warning: data.hub_revision is unpinned ({revision!r}): dataset {repo_id} resolved "
              f"to commit {sha}; to rerun on exactly these data, set data.hub_revision: {sha}",
              file=sys.stderr)
    print(f"downloading dataset {repo_id}@{sha} from the Hugging Face hub ...")
    try:
        snapshot_download(repo_id, repo_type="dataset", revision=sha, local_dir=dest,
                          allow_patterns=["*.jsonl", "*.json", "*.parquet"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise _hub_unavailable(repo_id, err)
    files = sorted(p for p in Path(dest).rglob("*")
                   if p.suffix in (".jsonl", ".json", ".parquet") and ".cache" not in p.parts)
    if not files:
        raise DataError([f"dataset {repo_id!r} at commit {sha} has no JSONL, JSON or Parquet files"])
    return files, {"hub_dataset": repo_id, "requested_revision": revision, "commit_sha": sha}
