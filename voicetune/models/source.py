"""What ``model.source`` points at, as a fingerprint that changes exactly when its content does.

``model.source`` is a param string, so DVC alone would never notice an edited local folder.
The ``model_source`` stage runs on every ``dvc repro`` (``always_changed``) and writes this
fingerprint; ``base_model`` depends on that file, so it reruns only when the bytes differ:
- ``embedded:<name>``: the wheel's package version and the MD5 of its GGUF file;
- a local folder: the MD5 of every file that ``base_model.materialize`` copies;
- a hub repo id: the repo and the pinned revision (a commit hash names its content; no network).
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from voicetune.models.base_model import _REPO_ID, EMBEDDED, copied_files, embedded_gguf


def file_md5(path: Path, cache: dict) -> str:
    """MD5 of ``path``, from ``cache`` when its size, mtime and inode are unchanged: a no-op
    ``dvc repro`` does not reread gigabytes of weights (DVC's own state cache does the same)."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = cache.get(key)
    if hit and hit["stamp"] == stamp:
        return hit["md5"]
    with open(path, "rb") as f:
        cache[key] = {"stamp": stamp, "md5": hashlib.file_digest(f, "md5").hexdigest()}
    return cache[key]["md5"]


def fingerprint(source: str, revision: str | None, cache: dict) -> dict:
    if source.startswith("embedded:"):
        name = source.removeprefix("embedded:")
        gguf = embedded_gguf(name)
        dist = EMBEDDED[name][0].replace("_", "-")
        return {"kind": "embedded", "source": source, "package": dist,
                "version": metadata.version(dist), "file": gguf.name, "md5": file_md5(gguf, cache)}
    folder = Path(source).expanduser()
    if folder.is_dir():
        return {"kind": "folder", "source": source,
                "files": {f.name: file_md5(f, cache) for f in copied_files(folder)}}
    if _REPO_ID.match(source) and not Path(source).suffix:  # as materialize decides
        return {"kind": "hub", "source": source, "revision": revision}
    # base_model says what is wrong with it, with the full message
    return {"kind": "unknown", "source": source}


def read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
