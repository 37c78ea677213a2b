"""Stand-ins for what the tests would otherwise reach over the network: a generator, an
OpenAI-compatible endpoint serving it, and the Hugging Face hub client; and the real
OpenAI-compatible server, mlx_lm.server, started on 127.0.0.1 for the tests that need one."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from voicetune.models.generators import Reply

from tests.conftest import ROOT, qa, write_jsonl


class Fake:
    """Questions named after the passage's first words; grounded answers; optionally fails
    after ``fail_after`` calls (a killed run)."""

    name = identity = "fake generator"
    settings: dict = {}

    def __init__(self, fail_after: int | None = None, shared_question: str | None = None):
        self.calls, self.chats, self.fail_after = 0, [], fail_after
        self.shared_question = shared_question

    def complete(self, chats, progress=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.chats += chats
        out = []
        for chat in chats:
            if chat[0]["role"] == "user":  # the question prompt
                words = chat[0]["content"].split(":\n\n", 1)[1].split()[:3]
                shared = [f"3. {self.shared_question}"] if self.shared_question else []
                out.append(Reply("\n".join([f"1. What do you mean by {' '.join(words)}?",
                                            f"2. Why did you write about {words[0]} that way?", *shared]),
                                 "stop"))
            else:
                passage = chat[0]["content"].split(":\n\n", 1)[1].split()
                out.append(Reply("I wrote that " + " and ".join(passage[1:40:4]) + ", as I remember it.",
                                 "stop"))
            if progress:
                progress(1)
        return out


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/chat/completions answering like Fake, recording the Authorization headers, the
    paths and the messages of every request."""

    seen_auth: list = []
    seen_paths: list = []
    seen_messages: list = []

    def answer(self, messages: list[dict]) -> Reply:
        return Fake().complete([messages])[0]

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen_auth.append(self.headers.get("Authorization"))
        type(self).seen_paths.append(self.path)
        type(self).seen_messages.append(body["messages"])
        reply = self.answer(body["messages"])
        data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                        "message": {"role": "assistant", "content": reply.text}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


def plain_version(text: str) -> str:
    """A paraphrase that passes the rewrite stage's default checks, made without a model: the
    author's pronouns turned to the third person and every fourth word left out (no run of 6
    words is copied, about three quarters of the content is kept)."""
    third = {"i": "she", "me": "her", "my": "her", "we": "they", "our": "their", "us": "them",
             "i'm": "she's", "i've": "she has", "i'd": "she would", "i'll": "she will"}
    words = [third.get(w.lower(), w) for w in text.split()]
    return " ".join(w for i, w in enumerate(words) if i % 4 != 3)


class FakeRewriter(FakeOpenAI):
    """The rewrite stage's generator: ``plain_version`` of the text after the prompt's "\n\n"."""

    seen_auth: list = []
    seen_paths: list = []
    seen_messages: list = []

    def answer(self, messages):
        return Reply(plain_version(messages[-1]["content"].split(":\n\n", 1)[1]), "stop")


class FakeJudge(FakeOpenAI):
    """A judge: ``choose(first, second)`` -> its reply, given the two answers the judge prompt
    shows ("Answer A:\n...\n\nAnswer B:\n...\n\n"). Records what FakeOpenAI records."""

    seen_auth: list = []
    seen_paths: list = []
    seen_messages: list = []
    choose = staticmethod(lambda first, second: "A")

    def answer(self, messages):
        text = messages[-1]["content"]
        first = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
        second = text.split("\n\nAnswer B:\n", 1)[1].rsplit("\n\n", 1)[0]
        return Reply(type(self).choose(first, second), "stop")


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering with ``handler``; its /v1 base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlx_lm_server(model_dir: Path) -> Iterator[str]:
    """mlx_lm.server serving ``model_dir`` on 127.0.0.1 (started through the package so that
    it gets the OpenBLAS preload); its base URL once it answers."""
    import httpx

    port = free_port()
    code = ("import sys, voicetune; from mlx_lm.server import main; "
            f"sys.argv = ['mlx_lm.server', '--model', {str(model_dir)!r}, '--host', '127.0.0.1', "
            f"'--port', '{port}']; main()")
    # one BLAS thread: decoding one request of a 135M model gains nothing from more, and on a
    # shared CPU their spin-waiting made it ~4x slower (16 tokens: 50 s, not 14 s)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"mlx_lm.server exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("mlx_lm.server did not answer within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


SHA = "0123456789abcdef0123456789abcdef01234567"


class RecordingHub:
    """A stand-in for the hub client: records every call and answers as the hub would,
    writing one data file on download; nothing goes over the network."""

    def __init__(self, monkeypatch):
        import huggingface_hub

        self.calls = []
        hub = self

        class Api:
            def dataset_info(self, repo_id, *, revision=None, **_):
                hub.calls.append(("dataset_info", repo_id, revision))
                return type("DatasetInfo", (), {"sha": SHA})()

        def snapshot_download(repo_id, *, repo_type, revision, local_dir, allow_patterns, **_):
            hub.calls.append(("snapshot_download", repo_id, repo_type, revision))
            write_jsonl(Path(local_dir) / "data.jsonl", [qa(1)])
            return str(local_dir)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
