"""Stand-ins for what the data tests would otherwise reach over the network: a generator, an
OpenAI-compatible endpoint serving it, and the Hugging Face hub client."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from voicetune.data.ingest import Reply

from tests.conftest import qa, write_jsonl


class Fake:
    """Questions named after the passage's first words; grounded answers; optionally fails
    after ``fail_after`` calls (a killed run)."""

    name = identity = "fake generator"

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
    """/v1/chat/completions answering like Fake, recording the Authorization headers."""

    seen_auth: list = []
    seen_paths: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen_auth.append(self.headers.get("Authorization"))
        FakeOpenAI.seen_paths.append(self.path)
        reply = Fake().complete([body["messages"]])[0]
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
