"""Atomic output writing: a stage either leaves complete outputs or none at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; on success it replaces ``target``.

    On any exception the temporary folder is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary files
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(folder: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success each file in it replaces its namesake in
    ``folder`` (one ``os.replace`` each), and the folder's other files stay: several stages
    write into one folder (metrics/plots). On any exception ``folder`` is left untouched."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            f.chmod(0o644)
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **open_args) -> Iterator:
    """Yield a file open for writing beside ``path``; on success it replaces ``path`` in one
    ``os.replace``. On any exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def dump_json(obj) -> str:
    """Stable JSON text (fixed key order and indentation) so DVC hashes are reproducible."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, dump_json(obj))

