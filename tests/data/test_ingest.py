"""The ingest stage: parsing the generator's replies, every rejection reason, the cache (hits,
one changed post, a killed run), provenance, the API key kept out of every file, clear errors,
and an end-to-end run through a real OpenAI-compatible HTTP server (mlx_lm.server)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from voicetune.data import ingest
from voicetune.data.ingest import IngestError, check_answer, parse_questions
from voicetune.models import generators
from voicetune.models.generators import Reply
from voicetune.core.jsonl import dumps_jsonl
from voicetune.core.params import load_params
from voicetune.data.posts import read_posts, split_passages

from tests.conftest import ROOT
from tests.harness.fakes import Fake, FakeOpenAI, serving

P = load_params(ROOT / "params.yaml")["ingest"]
PERSONA = "You are Sam, who keeps bees."
BEES = ("I started keeping bees the spring my father retired. He had bought two hives from a "
        "neighbour who was moving away, and neither of us knew the first thing about them. The "
        "first summer we lost one colony to wax moths because we opened the hive too often, "
        "fussing over every frame. Bees mostly want to be left alone, and I keep notes in a "
        "cheap school exercise book: the date, the weather, and whether I saw the queen.")
GOOD = ("I learned the hard way that my bees want to be left alone: we lost a colony to wax "
        "moths the first summer because we kept opening the hive.")


# ------------------------------------------------------------------------------ parsing
def test_numbered_questions_are_parsed_and_the_rest_counted():
    reply = ("Here are three questions:\n1. What was the hardest part of keeping bees?\n"
             "2) **Why do bees want to be left alone?**\n3. Tell me about the moths.\n"
             "4. Who?\n5. <question>\n6. How heavy is a full hive?")
    questions, rejected = parse_questions(reply, 5)
    assert questions == ["What was the hardest part of keeping bees?",
                         "Why do bees want to be left alone?"]
    assert rejected == {"not_a_question": 2, "markup": 1}  # the preamble is no rejection
    assert parse_questions(reply, 1) == (["What was the hardest part of keeping bees?"], {})
    assert parse_questions("The text is about bees. It is warm.", 3) == ([], {"unparseable": 1})
    # a model that dropped the numbering still asked something
    assert parse_questions("What is a queen?\nWhy wax moths?", 3)[0] == ["What is a queen?", "Why wax moths?"]


@pytest.mark.parametrize("reply, reason", [
    (Reply(GOOD[:-1] + " and then the", "length"), "cut"),  # no whole sentence to keep
    (Reply(GOOD + " <|im_end|>", "stop"), "markup"),
    (Reply("I keep bees.", "stop"), "too_short"),
    (Reply(" ".join([GOOD] * 8), "stop"), "too_long"),
    (Reply(BEES.split(". ", 1)[1], "stop"), "copied"),
    (Reply("I think football is a wonderful sport for children and teachers across Europe.",
           "stop"), "ungrounded"),
    (Reply(GOOD.replace("I learned", "Beekeepers learn").replace("my bees", "bees")
           .replace("we lost", "a keeper lost").replace("we kept", "they kept"), "stop"),
     "not_first_person"),
    (Reply(GOOD, "stop"), None),
])
def test_each_rejection_reason(reply, reason):
    assert check_answer(reply, BEES, P)[0] == reason
    assert reason is None or reason in ingest.REASONS


def test_a_cut_answer_keeps_its_whole_sentences():
    rambling = GOOD + " Now I keep notes in a cheap school exercise book, and the"
    assert check_answer(Reply(rambling, "length"), BEES, P) == (None, GOOD)
    assert check_answer(Reply(rambling, "length"), BEES, {**P, "trim_cut": False})[0] == "cut"
    # what is left must still pass every check: one short sentence is not enough
    assert check_answer(Reply("I did. Then we saw the", "length"), BEES, P)[0] == "cut"
    assert ingest.whole_sentences('He said "leave them." And then') == 'He said "leave them."'
    assert ingest.whole_sentences("No end at all") == ""


def test_grounding_and_copying_measures():
    assert ingest.grounding(GOOD, BEES) > 0.5
    assert ingest.grounding("Football tonight.", BEES) == 0.0
    assert ingest.copied_share(BEES, BEES) == 1.0
    assert ingest.copied_share(GOOD, BEES) < 0.3


# ------------------------------------------------------------------------------ a fake generator
def write_posts(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(f"---\ntitle: {name}\n---\n\n{text}\n", encoding="utf-8")
    return folder


def paragraph(topic: str, n: int = 60) -> str:
    return " ".join(f"{topic}{i % 7} matters to me because of storms, tides and boats."
                    for i in range(n // 10))


def corpus(folder: Path) -> Path:
    return write_posts(folder, {
        "a.md": paragraph("anchor") + "\n\n## Second\n\n" + paragraph("bowline"),
        "b.md": paragraph("compass"),
        "c.md": paragraph("dinghy") + "\n\n## More\n\n" + paragraph("ebb"),
    })


def ingest_run(source: Path, cache: Path, generator, **params):
    p = {**P, "questions": 2, "batch_size": 1, "min_grounding": 0.2, **params}
    posts, _ = read_posts(source)
    passages = [x for post in posts for x in split_passages(post, 80, 10)]
    rows, metrics = ingest.run(posts, passages, PERSONA, generator, p, cache)
    return rows, metrics, passages


def test_progress_counts_every_reply_as_it_comes_and_ends_at_the_total(tmp_path):
    posts, _ = read_posts(corpus(tmp_path / "posts"))
    passages = [x for post in posts for x in split_passages(post, 80, 10)]
    p = {**P, "questions": 3, "batch_size": 4, "min_grounding": 0.2}  # Fake asks only 2
    total = len(passages) * (1 + p["questions"])
    for _ in range(2):  # generated, then all from the cache
        ticks = []
        ingest.run(posts, passages, PERSONA, Fake(), p, tmp_path / "cache", progress=ticks.append)
        assert sum(ticks) == total
    # while generating, one tick per reply (the first batch: 4 question lists, then 8 answers)
    ticks = []
    ingest.run(posts, passages, PERSONA, Fake(), p, tmp_path / "other", progress=ticks.append)
    assert ticks[:12] == [1] * 12 and ticks[12] == 4 * 3 - 8


def test_pairs_carry_provenance_in_the_format_prepare_reads(tmp_path):
    from voicetune.data.qa import load_exchanges

    rows, metrics, passages = ingest_run(corpus(tmp_path / "posts"), tmp_path / "cache", Fake())
    assert len(passages) == 5 and metrics["pairs"] == len(rows) == 10
    assert metrics["rejected"] == dict.fromkeys(ingest.REASONS, 0)
    for row in rows:
        assert set(row) == {"conversation", "post_id", "passage_id", "generator", "prompt_version"}
        assert row["generator"] == "fake generator" and row["prompt_version"] == ingest.PROMPT_VERSION
        assert row["passage_id"].startswith(row["post_id"] + "#p")
    path = tmp_path / "pairs.jsonl"
    path.write_text(dumps_jsonl(rows))
    exchanges = load_exchanges([path])
    assert len(exchanges) == 10 and {ex.post for ex in exchanges} == {"a.md", "b.md", "c.md"}


def test_a_question_asked_twice_in_the_corpus_is_kept_once(tmp_path):
    gen = Fake(shared_question="What got you started on all this?")
    rows, metrics, passages = ingest_run(corpus(tmp_path / "posts"), tmp_path / "cache", gen,
                                         questions=3)
    assert metrics["rejected"]["duplicate"] == len(passages) - 1
    assert sum(r["conversation"][0]["content"] == "What got you started on all this?" for r in rows) == 1


def test_second_run_is_all_cache_hits_and_one_changed_post_regenerates_only_its_passages(tmp_path):
    posts = corpus(tmp_path / "posts")
    rows, first, passages = ingest_run(posts, tmp_path / "cache", Fake())
    again = Fake()
    rows2, second, _ = ingest_run(posts, tmp_path / "cache", again)
    assert again.calls == 0 and rows2 == rows
    assert (second["cache_hits"], second["passages_generated"]) == (len(passages), 0)
    assert second["pairs_per_minute"] is None

    # a stricter threshold is applied to the cached replies: nothing is generated again
    strict = Fake()
    _, metrics, _ = ingest_run(posts, tmp_path / "cache", strict, min_answer_words=100)
    assert strict.calls == 0 and metrics["pairs"] == 0 and metrics["rejected"]["too_short"] == 10

    write_posts(posts, {"b.md": paragraph("compass") + " A new sentence about the compass rose."})
    changed = Fake()
    _, third, _ = ingest_run(posts, tmp_path / "cache", changed)
    assert third["passages_generated"] == 1 and third["cache_hits"] == len(passages) - 1
    assert all("compass" in chat[-1]["content"] for chat in changed.chats)


def test_a_killed_run_resumes_from_the_passages_it_finished(tmp_path):
    posts = corpus(tmp_path / "posts")
    with pytest.raises(KeyboardInterrupt):
        ingest_run(posts, tmp_path / "cache", Fake(fail_after=4))  # 2 calls per passage
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    assert not list((tmp_path / "cache").glob(".*"))  # no half-written entry
    rows, metrics, passages = ingest_run(posts, tmp_path / "cache", Fake())
    assert (metrics["cache_hits"], metrics["passages_generated"]) == (2, len(passages) - 2)
    assert rows == ingest_run(posts, tmp_path / "fresh", Fake())[0]


def test_the_cache_key_covers_generator_persona_prompt_and_generation_params(tmp_path):
    posts, _ = read_posts(corpus(tmp_path / "posts"))
    passage = split_passages(posts[0], 80, 10)[0]
    key = ingest.cache_key(passage, posts[0].title, PERSONA, "g", P)
    assert key == ingest.cache_key(passage, posts[0].title, PERSONA, "g", {**P, "min_grounding": 0.9})
    for other in (ingest.cache_key(passage, posts[0].title, PERSONA, "h", P),
                  ingest.cache_key(passage, posts[0].title, "You are Kim.", "g", P),
                  ingest.cache_key(passage, posts[0].title, PERSONA, "g", {**P, "max_tokens": 64}),
                  ingest.cache_key(passage, posts[0].title, PERSONA, "g", {**P, "temperature": 0.7})):
        assert other != key


# ------------------------------------------------------------------------------ endpoints
@pytest.fixture
def fake_server():
    FakeOpenAI.seen_auth, FakeOpenAI.seen_paths = [], []
    with serving(FakeOpenAI) as url:
        yield url


def stage_project(tmp_path: Path, **ingest_params) -> Path:
    corpus(tmp_path / "posts")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update({"source": "posts", "max_words": 80, "min_words": 10, "limit": None,
                             "questions": 2, "min_grounding": 0.2, **ingest_params})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run_ingest(project: Path, env: dict | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "stages/ingest.py")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_stage_through_an_endpoint_never_writes_the_api_key(tmp_path, fake_server):
    secret = "sk-test-0123456789abcdef"
    project = stage_project(tmp_path, endpoint=fake_server, endpoint_model="m",
                            api_key_env="VOICETUNE_TEST_KEY")
    result = run_ingest(project, dict(os.environ, VOICETUNE_TEST_KEY=secret))
    assert result.returncode == 0, result.stderr
    assert FakeOpenAI.seen_auth and set(FakeOpenAI.seen_auth) == {f"Bearer {secret}"}
    metrics = json.loads((project / "metrics/ingest.json").read_text())
    assert metrics["pairs"] == 10 and metrics["generator"] == f"endpoint {fake_server} model m"
    assert metrics["posts"] == 3 and metrics["passages"] == 5 and metrics["problems"] == []
    rows = [json.loads(line) for line in (project / "data/ingested/pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    written = [f for f in project.rglob("*") if f.is_file()]
    assert any("cache" in f.parts for f in written)
    assert not [f for f in written if secret in f.read_text(errors="replace")]
    assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("url, shown", [
    ("https://user:sk-0123@api.example.com/v1", "https://***@api.example.com/v1"),
    ("https://sk-0123@api.example.com/v1", "https://***@api.example.com/v1"),
    ("https://api.example.com/v1?api_key=sk-0123&api-version=2024-06-01",
     "https://api.example.com/v1?api_key=***&api-version=2024-06-01"),
    ("http://h:8080/v1?key=AIza0123&token=t0k&access_token=a0&X-Amz-Signature=s0&sig=s1",
     "http://h:8080/v1?key=***&token=***&access_token=***&X-Amz-Signature=***&sig=***"),
    ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
])
def test_safe_url_drops_credentials(url, shown):
    assert generators.safe_url(url) == shown
    assert generators.has_credentials(url) == (shown != url)


def test_credentials_in_the_endpoint_url_are_never_written_or_printed(tmp_path, fake_server):
    """A key in the URL (user:key@host, ?api_key=...) still goes with every request, but the
    metrics, every pair's provenance, the cache and the output show the URL without it."""
    secrets = ("hunter2-pw", "sk-url-0123456789", "tok-0123456789")
    url = fake_server.replace("http://", f"http://bob:{secrets[0]}@") + \
        f"?api_key={secrets[1]}&token={secrets[2]}&api-version=1"
    project = stage_project(tmp_path, endpoint=url, endpoint_model="m")
    result = run_ingest(project)
    assert result.returncode == 0, result.stderr
    shown = fake_server.replace("http://", "http://***@") + "?api_key=***&token=***&api-version=1"
    metrics = json.loads((project / "metrics/ingest.json").read_text())
    assert metrics["pairs"] == 10 and metrics["generator"] == f"endpoint {shown} model m"
    rows = [json.loads(line) for line in (project / "data/ingested/pairs.jsonl").read_text().splitlines()]
    assert {row["generator"] for row in rows} == {f"endpoint {shown} model m"}
    # the requests carried the key: what the URL asked for
    assert FakeOpenAI.seen_paths and all(f"api_key={secrets[1]}&token={secrets[2]}" in path
                                         for path in FakeOpenAI.seen_paths)
    written = [f for f in project.rglob("*") if f.is_file() and f.name != "params.yaml"]
    assert any("cache" in f.parts for f in written)
    assert not [(f, s) for f in written for s in secrets if s in f.read_text(errors="replace")]
    assert not [s for s in secrets if s in result.stdout + result.stderr]
    assert f"WARNING: ingest.endpoint holds credentials ({shown}): params.yaml and dvc.lock" \
        in result.stderr  # which DVC writes from params.yaml, as it is
    # nor in the errors
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = generators.Endpoint(f"http://bob:{secrets[0]}@127.0.0.1:{port}/v1?key={secrets[1]}", "m", None,
                          timeout=5.0, max_tokens=8, temperature=0.0, seed=0, section="ingest")
    with pytest.raises(IngestError) as err:
        gen.complete([[{"role": "user", "content": "Hello?"}]])
    assert f"ingest.endpoint http://***@127.0.0.1:{port}/v1?key=***: cannot connect" in str(err.value)
    assert not [s for s in secrets if s in str(err.value)]


class NotAnAPI(BaseHTTPRequestHandler):
    """A web server, but no OpenAI API: http.server answers a POST with 501 by itself."""

    def log_message(self, *args):
        pass


class HTMLPage(NotAnAPI):
    def do_POST(self):
        page = b"<html><head><title>Home</title></head><body><h1>My blog</h1></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


@pytest.mark.parametrize("handler, answered", [
    (NotAnAPI, "answered HTTP 501 (Error response Error code: 501 Message: Unsupported method ('POST')"),
    (HTMLPage, "answered, but not with a chat completion ('<html><head><title>Home</title>"),
])
def test_a_web_server_that_is_no_openai_api_says_what_was_expected_where(handler, answered):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        gen = generators.Endpoint(url, "m", None, timeout=5.0, max_tokens=8, temperature=0.0,
                                  seed=0, section="ingest")
        with pytest.raises(IngestError) as err:
            gen.complete([[{"role": "user", "content": "Hello?"}]])
    finally:
        server.shutdown()
    message = str(err.value)
    assert message.startswith(f"ingest.endpoint: {url}/chat/completions {answered}")
    assert "expected an OpenAI-compatible chat completions API there (llama.cpp's server, " \
           "Ollama, vLLM, mlx_lm.server, a hosted API)" in message
    assert "ingest.endpoint_model (now 'm')" in message


def test_an_unset_key_variable_is_a_clear_error(monkeypatch, fake_server):
    monkeypatch.delenv("VOICETUNE_TEST_UNSET", raising=False)
    p = {**P, "endpoint": fake_server, "api_key_env": "VOICETUNE_TEST_UNSET"}
    with pytest.raises(IngestError, match="VOICETUNE_TEST_UNSET, which is not set; export "
                                          "VOICETUNE_TEST_UNSET=<your key>"):
        generators.make_generator(p, "models/base", "ingest")  # before anything is read or written
    assert FakeOpenAI.seen_auth == []


def test_an_unreachable_endpoint_is_a_clear_error_naming_it():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    gen = generators.Endpoint(url, "m", None, timeout=5.0, max_tokens=8, temperature=0.0, seed=0,
                              section="ingest")
    with pytest.raises(IngestError, match=f"ingest.endpoint {url}: cannot connect .*start the server"):
        gen.complete([[{"role": "user", "content": "Hello?"}]])


# ------------------------------------------------------------------------------ a real server
@pytest.mark.slow
def test_end_to_end_through_mlx_lm_server(tmp_path, mlx_server):
    """The stage script talks to mlx_lm.server over HTTP. The 135M model writes weak pairs:
    this checks the mechanics and the filter, not the writing."""
    write_posts(tmp_path / "posts", {"bees.md": BEES})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["system_prompt"] = PERSONA
    # two questions, lenient thresholds: mlx_lm.server decodes one request at a time, slowly
    # on a shared CPU; the default thresholds are applied below, to the cached replies
    lenient = {"min_grounding": 0.0, "max_copied": 1.0, "min_answer_words": 1,
               "max_answer_words": 1000}
    params["ingest"].update({"source": "posts", "endpoint": mlx_server, "questions": 2,
                             "max_tokens": 160, "timeout": 900.0, **lenient})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_ingest(tmp_path, timeout=1500)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics/ingest.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "data/ingested/pairs.jsonl").read_text().splitlines()]
    assert metrics["generator"] == f"endpoint {mlx_server} model default_model"
    assert metrics["passages_generated"] == 1 and metrics["pairs_per_minute"] is not None
    assert len(rows) == metrics["pairs"]
    rejected = metrics["rejected"]
    # the questions asked were parsed or counted; every answer kept or counted under a reason
    assert metrics["questions_parsed"] + rejected["unparseable"] + rejected["not_a_question"] >= 1
    answered = metrics["answers_generated"]
    answer_reasons = ("cut", "markup", "too_short", "too_long", "ungrounded", "copied", "not_first_person")
    assert answered == metrics["questions_parsed"] == metrics["pairs"] + sum(rejected[r] for r in answer_reasons)
    p = {**P, **params["ingest"]}
    # every answer accounted for exactly, from the server's raw replies in the cache: kept (its
    # whole sentences, if cut) in order, or counted under the one reason it fails
    [cached] = (tmp_path / "cache/ingest").glob("*.json")
    verdicts = [check_answer(Reply(a["text"], a["finish_reason"]), BEES, p)
                for a in json.loads(cached.read_text())["answers"]]
    assert len(verdicts) == answered
    assert [r["conversation"][1]["content"] for r in rows] == [text for why, text in verdicts if why is None]
    assert {r: rejected[r] for r in answer_reasons} == {r: sum(why == r for why, _ in verdicts)
                                                        for r in answer_reasons}
    # greedy, with lenient thresholds: the model's answers make pairs (on this CPU: both of 2,
    # one trimmed to its whole sentences); all of them cut or rejected is a failure
    assert metrics["pairs"] >= 1
    for row in rows:
        assert row["post_id"] == "bees.md" and row["conversation"][0]["content"].endswith("?")
        assert row["generator"] == metrics["generator"]
        assert check_answer(Reply(row["conversation"][1]["content"], "stop"), BEES, p)[0] is None
    # the default, stricter thresholds filter the same cached replies: nothing is generated
    strict = {**p, **{k: P[k] for k in lenient}}
    posts, _ = read_posts(tmp_path / "posts")
    gen = generators.make_generator(strict, "unused: not in-process", "ingest")
    _, again = ingest.run(posts, split_passages(posts[0], p["max_words"], p["min_words"]), PERSONA,
                          gen, strict, tmp_path / "cache/ingest")
    assert again["cache_hits"] == 1 and again["pairs"] <= metrics["pairs"]
    assert again["answers_generated"] == answered
    print(json.dumps({"pairs": rows, "metrics": metrics, "strict": again}, indent=1))


# ------------------------------------------------------------------------------ split_by: post
def test_split_by_post_keeps_each_post_in_one_split(tmp_path):
    from voicetune.data.qa import DataError, load_exchanges, split

    rows = [{"conversation": [{"role": "user", "content": f"Question {i} on post {i % 7}?"},
                              {"role": "assistant", "content": f"Answer {i}."}],
             "post_id": f"post-{i % 7}.md", "passage_id": f"post-{i % 7}.md#p{i}"} for i in range(70)]
    path = tmp_path / "pairs.jsonl"
    path.write_text(dumps_jsonl(rows))
    splits = split(load_exchanges([path]), seed=42, valid_ratio=0.1, test_ratio=0.2, by="post")
    posts = {name: {ex.post for ex in part} for name, part in splits.items()}
    assert not (posts["train"] & posts["valid"] or posts["train"] & posts["test"]
                or posts["valid"] & posts["test"])
    assert sum(map(len, splits.values())) == 70 and len(splits["test"]) >= 14 and splits["valid"]

    path.write_text(dumps_jsonl(rows[:3]) + json.dumps({"question": "Why?", "answer": "Because."}) + "\n")
    with pytest.raises(DataError, match=r"split_by is post.*\n.*pairs.jsonl:4: no post_id"):
        split(load_exchanges([path]), seed=42, valid_ratio=0.1, test_ratio=0.1, by="post")
