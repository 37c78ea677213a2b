"""Phi-3-mini's real tokenizer vocabulary, available offline: llama.cpp's vocab-only GGUF.

The Phi-3 weights (7.6 GB, on the Hugging Face hub) cannot be fetched everywhere; its
vocabulary (0.7 MB) ships with llama.cpp's tokenizer tests, vendored in the PyPI sdist of
llama-cpp-python. Dev machines and CI have the file in ../shared; elsewhere it is fetched
once from PyPI (the one registry a setup already needs) and cached. Both archive and file
are pinned by sha256, so every machine gets the same bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError

FILENAME = "ggml-vocab-phi-3.gguf"
SHA256 = "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "phi-3" / FILENAME
CACHE_ENV = "VOICETUNE_CACHE_DIR"

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/{FILENAME}"
# PEP 691 JSON "simple" index: what pip itself reads, served by PyPI and its mirrors.
INDEX_URL = f"https://pypi.org/simple/{PACKAGE}/"
TIMEOUT_S = 60


class Phi3VocabError(UserError, RuntimeError):
    pass


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voicetune"


def phi3_vocab_path() -> Path:
    """The vocab GGUF: ../shared's copy if there is one, else the cached copy (fetched if missing)."""
    if SHARED.is_file():
        return _verified(SHARED)
    cached = cache_dir() / FILENAME
    if not cached.is_file():
        fetch(cached)
    return _verified(cached)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(path: Path) -> Path:
    if _sha256(path.read_bytes()) != SHA256:
        raise Phi3VocabError(
            f"{path} is not the expected {FILENAME} (sha256 differs from {SHA256}); "
            "delete it and it will be fetched again from PyPI"
        )
    return path


def _sdist_url() -> str:
    request = urllib.request.Request(INDEX_URL,
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        files = json.load(response)["files"]
    for entry in files:
        if entry["filename"] == SDIST:
            if entry.get("hashes", {}).get("sha256", SDIST_SHA256) != SDIST_SHA256:
                raise Phi3VocabError(f"{INDEX_URL} lists {SDIST} with an unexpected sha256")
            return entry["url"]
    raise Phi3VocabError(f"{INDEX_URL} does not list {SDIST}")


def _download(url: str, out) -> None:
    """Stream ``url`` into the file object ``out``, checking the pinned sha256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        raise Phi3VocabError(f"downloaded {SDIST} from {url} has the wrong sha256")
    out.seek(0)


def fetch(dest: Path) -> Path:
    """Download the llama-cpp-python sdist (77 MB) and write only the vocab file to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {FILENAME} from PyPI ({PACKAGE}=={VERSION} sdist, 77 MB) into {dest} ...")
    try:
        with tempfile.TemporaryFile(dir=dest.parent) as archive:
            _download(_sdist_url(), archive)
            with tarfile.open(fileobj=archive, mode="r:gz") as tar:
                member = tar.extractfile(MEMBER)
                if member is None:
                    raise Phi3VocabError(f"{SDIST} has no file {MEMBER}")
                data = member.read()
    except (OSError, tarfile.TarError, ValueError, KeyError) as err:  # URLError is an OSError
        raise Phi3VocabError(
            f"could not fetch {FILENAME} from PyPI ({INDEX_URL}): {type(err).__name__}: {err}\n"
            f"If this machine is offline, download {SDIST} elsewhere "
            f"(https://pypi.org/project/{PACKAGE}/{VERSION}/#files), copy its "
            f"{MEMBER.split('/', 1)[1]} to {dest}, or set {CACHE_ENV} to a folder holding it"
        ) from err
    if _sha256(data) != SHA256:
        raise Phi3VocabError(f"{MEMBER} in {SDIST} has an unexpected sha256")
    _write_bytes_atomic(dest, data)
    return dest


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    # as voicetune.files.write_text_atomic: a concurrent reader never sees half a file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
