"""Text generators for the stages that ask a model for text (ingest, judge), and their cache.

A generator is the pipeline's own base model in-process (offline, batched with
``generation.generate_batched``) or any OpenAI-compatible chat endpoint (``mlx_lm.server``,
Ollama, llama.cpp's server, a hosted API whose key is read from the environment, never stored).
A key written into the URL itself (``user:key@``, ``?api_key=``) is sent, but shown as ``***``
wherever the URL is written or printed (``safe_url``).

Both have ``complete(chats, progress) -> [Reply]``, a ``name`` (written into provenance), an
``identity`` (the name plus what makes its replies differ: the weights' hash; part of every
cache key) and ``settings`` (how they generate). Every error names the params keys of the
stage that made the generator (``section``: ``ingest``, ``eval.judge``).

``cached_complete`` keeps each reply in a JSON file named by a hash of everything it depends
on, so a rerun asks only what it has not asked before and a killed run resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from voicetune.core.errors import UserError
from voicetune.core.files import write_json_atomic


class GeneratorError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" (ended by itself) or "length" (hit max_tokens)


class InProcess:
    """The base model in this process: batched, greedy or seeded sampling."""

    def __init__(self, model_dir: str | Path, max_tokens: int, temperature: float, seed: int,
                 repetition_penalty: float | None, *, section: str):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer_config.json").is_file():
            raise GeneratorError(f"{model_dir}: no model folder (no tokenizer_config.json); build it "
                                 f"with `dvc repro base_model`, or set {section}.endpoint to a server")
        from mlx_lm.utils import load

        self.model, self.tokenizer = load(str(model_dir))
        self.settings = dict(max_tokens=max_tokens, temperature=temperature, seed=seed,
                             repetition_penalty=repetition_penalty)
        try:
            source = json.loads((model_dir / "source.json").read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            source = str(model_dir)
        self.name = f"in-process {model_dir.as_posix()} ({source})"
        # the weights themselves: a retrained or replaced models/base must not reuse the cache
        digest = hashlib.sha256()
        for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
            digest.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
        self.identity = f"{self.name} sha256:{digest.hexdigest()}"

    def complete(self, chats: list[list[dict]], progress: Callable[[int], None] | None = None
                 ) -> list[Reply]:
        """One reply per chat; ``progress(1)`` as each one is finished."""
        from voicetune.models.generation import generate_batched, prompt_tokens

        prompts = [prompt_tokens(self.tokenizer, chat) for chat in chats]
        # every prompt of the call in one continuous batch: on a CPU, decoding 24 answers at
        # once costs little more than decoding 8
        out = generate_batched(self.model, self.tokenizer, prompts, **self.settings,
                               batch_size=max(1, min(len(prompts), 64)), progress=progress)
        return [Reply(o["prediction"], o["finish_reason"]) for o in out]


# a query parameter whose name holds one of these carries a secret: api_key, key, access_token,
# token, sig, X-Amz-Signature, password, client_secret, auth, session...
_SECRET_NAME = re.compile(r"key|token|secret|pass|pwd|auth|sig|credential|session", re.IGNORECASE)


def has_credentials(url: str) -> bool:
    """Whether ``url`` holds what ``safe_url`` hides."""
    parts = urlsplit(url)
    return "@" in parts.netloc or any(_SECRET_NAME.search(item.partition("=")[0])
                                      for item in parts.query.split("&") if item)


def safe_url(url: str) -> str:
    """``url`` as it may be written or printed: credentials in it (``user:key@``, and the values
    of query parameters named like a key or a token) replaced by ``***``. The request itself
    still uses the URL as given; the key belongs in the variable <section>.api_key_env names."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{name}=***" if _SECRET_NAME.search(name) else
                     (f"{name}={value}" if sep else name)
                     for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def credentials_warning(endpoint: str, section: str) -> str | None:
    """What to say when <section>.endpoint holds credentials (None: it holds none)."""
    if not has_credentials(endpoint):
        return None
    # written nowhere by the stage; but DVC records the stage's params in dvc.lock
    return (f"{section}.endpoint holds credentials ({safe_url(endpoint)}): params.yaml and dvc.lock, "
            "which git tracks, keep them as written; put the key in an environment variable and "
            f"name it in {section}.api_key_env")


def _detail(err) -> str:
    """The server's own words for an HTTP error, short: an API's JSON error message, else the
    body's text without markup (a plain web server's error page)."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") or inner.get("detail") if isinstance(inner, dict) else inner
    else:
        text = body
    if not isinstance(text, str) or not text.strip():
        text = getattr(err.response, "text", "") or ""
    text = re.sub(r"<head.*?</head>", " ", text, flags=re.DOTALL | re.IGNORECASE)
    text = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    return text if len(text) <= 160 else text[:157] + "..."


class Endpoint:
    """An OpenAI-compatible chat endpoint, one request at a time."""

    def __init__(self, url: str, model: str, api_key_env: str | None, timeout: float,
                 max_tokens: int, temperature: float, seed: int, *, section: str):
        import openai

        self.section = section
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise GeneratorError(
                    f"{section}.api_key_env names the environment variable {api_key_env}, "
                    f"which is not set; export {api_key_env}=<your key> before running "
                    "(the key is read from there and never written anywhere), or set "
                    f"{section}.api_key_env: null for a local server")
        else:
            key = "none"  # local servers need none; never fall back to OPENAI_API_KEY silently
        # written and printed: safe_url; the cache key too, so that a new key keeps the cache
        self.url, self.model, self.timeout = safe_url(url), model, timeout
        parts = urlsplit(url)  # a query (?api-version=..., ?key=...) goes with every request
        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self.chat_url = safe_url(urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/")
                                             + "/chat/completions", parts.query, "")))
        self.client = openai.OpenAI(base_url=base, api_key=key, timeout=timeout, max_retries=1,
                                    default_query=dict(parse_qsl(parts.query, keep_blank_values=True)) or None)
        self.settings = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
        self.name = self.identity = f"endpoint {self.url} model {model}"

    def complete(self, chats: list[list[dict]], progress: Callable[[int], None] | None = None
                 ) -> list[Reply]:
        """One reply per chat, a request each; ``progress(1)`` after each."""
        import openai

        s = self.section
        replies = []
        for chat in chats:
            try:
                r = self.client.chat.completions.create(model=self.model, messages=chat, **self.settings)
            except openai.APITimeoutError:
                raise GeneratorError(
                    f"{s}.endpoint {self.url}: no reply within {self.timeout:g} s ({s}.timeout), "
                    "tried twice; is the server busy or stuck? A small model on a loaded CPU may "
                    f"need a larger {s}.timeout") from None
            except openai.APIConnectionError as err:
                base = str(self.client.base_url)
                cause = str(err.__cause__ or err).replace(base, safe_url(base))
                raise GeneratorError(
                    f"{s}.endpoint {self.url}: cannot connect ({cause}); start the server (e.g. "
                    "`python -m mlx_lm.server --model models/base --port 8080` for "
                    f"http://127.0.0.1:8080/v1) or fix {s}.endpoint; null generates in-process") from None
            except openai.AuthenticationError as err:
                raise GeneratorError(f"{s}.endpoint {self.url}: the key was refused ({err.status_code}); "
                                     f"check the variable that {s}.api_key_env names") from None
            except openai.APIStatusError as err:
                detail = _detail(err)
                if err.status_code in (404, 405, 501):  # no such path or method: not this API here
                    raise self._not_an_api(f"answered HTTP {err.status_code}"
                                           + (f" ({detail})" if detail else "")) from None
                raise GeneratorError(f"{s}.endpoint: {self.chat_url} answered HTTP {err.status_code} "
                                     f"for model {self.model!r}: {detail or 'no details'}") from None
            try:
                choice = r.choices[0]
                text, finish = choice.message.content, choice.finish_reason
            except (AttributeError, IndexError, TypeError, KeyError):
                raise self._not_an_api("answered, but not with a chat completion "
                                       f"({' '.join(str(r).split())[:80]!r})") from None
            replies.append(Reply(text or "", "length" if finish == "length" else "stop"))
            if progress:
                progress(1)
        return replies

    def _not_an_api(self, what: str) -> GeneratorError:
        s = self.section
        return GeneratorError(
            f"{s}.endpoint: {self.chat_url} {what}: expected an OpenAI-compatible chat "
            "completions API there (llama.cpp's server, Ollama, vLLM, mlx_lm.server, a hosted "
            f"API). Set {s}.endpoint to the API's base URL, the part before /chat/completions, "
            "usually ending in /v1 (mlx_lm.server: http://127.0.0.1:8080/v1, Ollama: "
            f"http://127.0.0.1:11434/v1), and {s}.endpoint_model (now {self.model!r}) to a "
            "model it serves; null generates in-process")


def stage_generator(p: dict, model_dir: str | Path, section: str, fast_cpu: str):
    """``make_generator`` for a stage: in-process, MLX's BLAS checked (a loud warning on the
    slow reference one) and the fast CPU kernels set by ``kernels.fast_cpu``; for an endpoint, a
    warning on stderr when a key would be sent in the clear."""
    import sys

    if not p["endpoint"]:
        from voicetune.core import blas, kernels

        blas.check(verbose=False)
        kernels.enable(fast_cpu)
    elif warning := credentials_warning(p["endpoint"], section):
        print(f"WARNING: {warning}", file=sys.stderr)
    return make_generator(p, model_dir, section)


def make_generator(p: dict, model_dir: str | Path, section: str):
    """The generator that the params ``p`` of ``section`` ask for: ``endpoint`` (null:
    in-process from ``model_dir``), ``endpoint_model``, ``api_key_env``, ``timeout``,
    ``max_tokens``, ``temperature``, ``seed``, ``repetition_penalty`` (in-process only)."""
    if p["endpoint"]:
        return Endpoint(p["endpoint"], p["endpoint_model"], p["api_key_env"], p["timeout"],
                        p["max_tokens"], p["temperature"], p["seed"], section=section)
    return InProcess(model_dir, p["max_tokens"], p["temperature"], p["seed"],
                     p["repetition_penalty"], section=section)


# ------------------------------------------------------------------------------ the cache
def cache_digest(what: dict) -> str:
    """The cache key of a reply (or a stage's record): sha256 of ``what`` as canonical JSON."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_record(path: Path, prompt_version: str) -> dict | None:
    """The cached record at ``path``, or None: absent, unreadable or of another prompt version
    (asked again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("prompt_version") == prompt_version else None


def reply_key(generator, chat: list[dict], prompt_version: str, extra=None) -> str:
    """Everything one reply depends on: the generator, the chat, how it generates, the prompt
    version and ``extra`` (anything else the caller's reply depends on)."""
    return cache_digest({"generator": generator.identity, "chat": chat,
                         "settings": generator.settings, "prompt_version": prompt_version,
                         "extra": extra})


def cached_complete(generator, chats: list[list[dict]], cache_dir: str | Path, prompt_version: str,
                    extra=None, progress: Callable[[int], None] | None = None, batch_size: int = 64
                    ) -> tuple[list[Reply], int]:
    """(one reply per chat, how many of them were asked: not in the cache). A chat repeated
    in ``chats`` is asked once. The replies not cached are asked ``batch_size`` at a time,
    each batch written as it completes (a killed run resumes after it); ``progress(n)``
    counts every chat."""
    cache_dir = Path(cache_dir)
    keys = [reply_key(generator, chat, prompt_version, extra) for chat in chats]
    found: dict[str, Reply] = {}
    todo: dict[str, list[dict]] = {}
    for key, chat in zip(keys, chats):
        if key in found or key in todo:
            continue
        record = read_record(cache_dir / f"{key}.json", prompt_version)
        if record is None:
            todo[key] = chat
        else:
            found[key] = Reply(record["text"], record["finish_reason"])
    if progress and len(chats) > len(todo):
        progress(len(chats) - len(todo))  # hits and repeats at once; asked ones as they come
    pending = list(todo.items())
    for start in range(0, len(pending), batch_size):
        batch = pending[start:start + batch_size]
        for (key, _), reply in zip(batch, generator.complete([chat for _, chat in batch], progress)):
            write_json_atomic(cache_dir / f"{key}.json", {
                "prompt_version": prompt_version, "generator": generator.name,
                "text": reply.text, "finish_reason": reply.finish_reason})
            found[key] = reply
    return [found[key] for key in keys], len(todo)
