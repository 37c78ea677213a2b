"""The arena in a real browser: Debian's chromium, driven by Playwright, clicking as a person would.

What this proves, on the REAL server (``python -m voicetune.tools.arena`` in a subprocess, with a
tiny random model, adapters, their fused copy and preference adapters on it: every model
battles):

- the battles are blind: before each vote, no response the page got (HTML, script, JSON,
  event stream) and nothing in the arena's part of the page names a model, once the
  generated answers are set aside (a random model may write "base" by chance);
- each kind of vote (A, B, tie, both bad) is one line in votes.jsonl, naming the models the
  page revealed, with the answers the page showed; the author's answer is revealed for a test
  question, and the ratings table fills in;
- a typed question full of HTML is shown as text, never run;
- the chat tab answers with two models at once, each in its column;
- no battle's side can be looked up: the chat tab's (greedy) answer to the same question is
  neither side's, and battles on one question do not repeat each other;
- 16 battles and 4 chats at once from threads: no error, every vote written once;
- ``kill -9`` mid-vote leaves votes.jsonl whole: every line parses, every vote the server
  acknowledged is there.

And, on the same app in-process with a stand-in generator (the only way to make a model
write ``<script>`` on demand, or hold its answer back): generated HTML is shown as text in the
battle and in the chat, and a page reloaded mid-battle picks the same battle up, finishes
its answers without repeating a character, and a double-clicked vote is one line.

Needs chromium (``apt-get install chromium``) and Playwright (``pip install playwright``;
no ``playwright install``: the system's chromium is used). Without them the module is
skipped, except under CI (the environment variable CI set), where it fails.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from voicetune.models.registry import NAMES
from voicetune.data.votes import CHOICES, read_votes

from tests.conftest import PERSONA, ROOT

CHROMIUM = shutil.which("chromium")
try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
_missing = [what for what, ok in (("chromium (apt-get install chromium)", CHROMIUM),
                                  ("playwright (pip install playwright)", sync_playwright)) if not ok]
if _missing:
    reason = f"the arena's browser test needs {' and '.join(_missing)}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

# every model the project can run, all of them battling: no name kept by hand here
MODEL_IDS = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b", re.I)
MODELS = list(NAMES)
MAX_TOKENS = 12
GENERATION_MS = 120_000  # generous: answers on a loaded 2-core machine
VOTE_BUTTONS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
VOTE_WORDS = {"A": "you preferred A", "B": "you preferred B", "tie": "a tie", "both_bad": "both bad"}
REVEAL = re.compile(r"A was (\w+), B was (\w+): (.+)\.")
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
TOKENS_AND_SECONDS = re.compile(r"^\d+ tokens, [\d.]+ s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ what the page receives
@dataclass
class Received:
    method: str
    url: str
    status: int
    content_type: str
    body: str | None        # None: the browser could not give it back
    post_data: str | None


class Recorder:
    """Every response the page gets, with its body (event streams whole, once they end)."""

    def __init__(self, page):
        self.page = page
        self.responses: list[Received] = []
        self.errors: list[str] = []  # uncaught exceptions in the page's script
        page.on("requestfinished", self._finished)
        page.on("pageerror", lambda err: self.errors.append(str(err)))

    def _finished(self, request):
        response = request.response()
        if response is None:
            return
        try:
            body = response.body().decode("utf-8", errors="replace")
        except PlaywrightError:
            body = None
        self.responses.append(Received(request.method, request.url, response.status,
                                       response.headers.get("content-type", ""), body,
                                       request.post_data))

    def wait_for(self, predicate, what: str, timeout: float = 60) -> Received:
        """The first response that satisfies ``predicate``, waiting for it to finish."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.responses if predicate(r)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"the page never got {what}"
            self.page.wait_for_timeout(50)  # lets Playwright deliver its events

    def stream_of(self, battle: str) -> Received:
        return self.wait_for(lambda r: f"/api/battles/{battle}/stream" in r.url,
                             f"the event stream of battle {battle}")

    def urls(self) -> list[str]:
        return [r.url for r in self.responses]


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.replace("\r\n", "\n").strip().split("\n\n"):
        lines = block.split("\n")
        name = next((ln[6:].strip() for ln in lines if ln.startswith("event:")), "message")
        data = "\n".join(ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:"))
        if data:
            events.append((name, json.loads(data)))
    return events


def texts(events, side: str | None = None) -> str:
    """The answer text of an event stream (of one side of a battle)."""
    return "".join(d["text"] for name, d in events
                   if name == "text" and (side is None or d.get("side") == side))


def streamed_text(body: str, side: str | None = None) -> str:
    return texts(sse_events(body), side)


def without_answers(r: Received) -> str:
    """A response body with the generated answers' texts blanked: a tiny random model may write
    "base" by chance; everything else (keys, event names, ids, statuses) stays."""
    if r.content_type.startswith("text/event-stream"):
        blocks = []
        for block in r.body.replace("\r\n", "\n").split("\n\n"):
            lines = block.split("\n")
            if any(ln.startswith("event:") and ln[6:].strip() == "text" for ln in lines):
                lines = [f"data: {json.dumps({**json.loads(ln[5:]), 'text': ''})}"
                         if ln.startswith("data:") else ln for ln in lines]
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
    if r.content_type.startswith("application/json"):
        data = json.loads(r.body)
        if isinstance(data, dict) and isinstance(data.get("answers"), dict):
            data["answers"] = {side: "" for side in data["answers"]}
        return json.dumps(data)
    return r.body


def assert_nothing_names_a_model(rec: Recorder) -> None:
    """Every response so far, but three that name models by design: /api/config (the chat
    tab's models, the same for every battle), /api/ratings (the table of all models) and a
    vote's reply (the reveal, after the vote)."""
    for r in rec.responses:
        if r.url.endswith(("/api/config", "/api/ratings", "/vote")):
            continue
        assert r.body is not None, f"no body for {r.method} {r.url}"
        seen = without_answers(r)
        assert not MODEL_IDS.search(seen), f"{r.method} {r.url} names a model: {seen[:2000]}"


ARENA_DOM = """() => {
  const arena = document.querySelector("#tab-arena").cloneNode(true);
  arena.querySelector("#answer-a").textContent = "";
  arena.querySelector("#answer-b").textContent = "";
  arena.querySelector("#ratings").remove();       // the ratings table lists every model, always
  arena.querySelector("#ratings-note").remove();
  return arena.outerHTML;
}"""


def assert_arena_dom_names_no_model(page) -> None:
    html = page.evaluate(ARENA_DOM)
    assert not MODEL_IDS.search(html), f"the arena's page names a model before the vote: {html}"


def open_arena(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    rec = Recorder(page)
    page.goto(url)
    expect(page.locator("#chat-models input")).not_to_have_count(0)  # /api/config arrived
    return page, rec


def new_battle(page, button: str) -> str:
    """Click ``button``; the new battle's id (from the server's reply)."""
    with page.expect_response(lambda r: r.url.endswith("/api/battles")
                              and r.request.method == "POST") as created:
        page.get_by_role("button", name=button, exact=True).click()
    assert created.value.ok, created.value.text()
    return created.value.json()["battle"]


def wait_for_answers(page, log=lambda: "") -> None:
    """Until both answers are complete (the vote buttons come on), or the battle failed."""
    page.wait_for_function("() => !document.querySelector('.vote').disabled"
                           " || document.querySelector('#battle-message').textContent",
                           timeout=GENERATION_MS)
    assert page.locator("#battle-message").text_content() == "", log()
    for choice in CHOICES:
        expect(page.get_by_role("button", name=VOTE_BUTTONS[choice])).to_be_enabled()


def wait_for_chat_answer(column, log=lambda: "") -> None:
    """Until the column's answer is complete (its status: "N tokens, S s"), or it failed."""
    status = column.locator(".status")
    expect(status).to_have_text(re.compile(r"tokens, .* s|failed"), timeout=GENERATION_MS)
    assert TOKENS_AND_SECONDS.match(status.text_content()), status.text_content() + log()


def vote_and_read_reveal(page, choice: str, click: str = "click") -> tuple[str, str]:
    getattr(page.get_by_role("button", name=VOTE_BUTTONS[choice]), click)()
    expect(page.locator("#reveal")).to_be_visible()
    reveal = REVEAL.fullmatch(page.locator("#reveal-names").text_content())
    assert reveal, page.locator("#reveal-names").text_content()
    a, b, said = reveal.groups()
    assert a in MODELS and b in MODELS and a != b and said == VOTE_WORDS[choice]
    for button in VOTE_BUTTONS.values():
        expect(page.get_by_role("button", name=button)).to_be_disabled()
    return a, b


def expect_ratings(page, votes: int) -> None:
    """The ratings table, refreshed after the last vote: a row for every battling model, and
    two battles counted per vote."""
    expect(page.locator("#ratings-note")).to_have_text(re.compile(rf"^{votes} vote\(s\) "))
    assert page.locator("#ratings tbody tr td:first-child").all_text_contents() == MODELS
    headers = page.locator("#ratings thead th").all_text_contents()
    battles = page.locator(f"#ratings tbody tr td:nth-child({headers.index('battles') + 1})") \
        .all_text_contents()
    assert sum(map(int, battles)) == 2 * votes
    # the votes recorded both answers: every rated model is rated with style control too
    rated, controlled = (page.locator(f"#ratings tbody tr td:nth-child({headers.index(name) + 1})")
                         .all_text_contents() for name in ("rating", "style-controlled"))
    assert [bool(c) for c in controlled] == [bool(r) for r in rated]


def check_votes_file(path: Path, expected: dict[str, dict]) -> list[dict]:
    """votes.jsonl holds exactly one line per vote in ``expected`` (battle id -> the fields
    it must have), and nothing else; every line parses."""
    lines = path.read_text(encoding="utf-8").splitlines()
    votes = [json.loads(line) for line in lines]
    assert read_votes(path) == (votes, [])
    assert sorted(v["battle_id"] for v in votes) == sorted(expected)  # one line each
    for vote in votes:
        want = expected[vote["battle_id"]]
        assert {k: vote[k] for k in want} == want, vote
    return votes


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        expect.set_options(timeout=30_000)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory) -> dict:
    """A tiny random base model, adapters that change its answers, their fused model, and
    preference adapters on that (dpo)."""
    from tests.harness.models import tiny_model_set

    return tiny_model_set(tiny_model_dir, tmp_path_factory.mktemp("arena_models"))


@dataclass
class RealServer:
    url: str
    proc: subprocess.Popen
    votes: Path
    references: dict[str, str]     # test question -> the author's answer
    output: list[str]
    acknowledged: dict[str, dict] = field(default_factory=dict)  # battle id -> fields of its vote

    def log(self) -> str:
        return "".join(self.output)


@pytest.fixture(scope="module")
def real_server(tiny, tiny_data_dir, tmp_path_factory):
    """``python -m voicetune.tools.arena`` on the tiny models, all four battling, killed at the end."""
    import httpx

    scratch = tmp_path_factory.mktemp("arena_real")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["arena"] = {**params.get("arena", {}), "adapter": "current", "rounds": 200, "seed": 0,
                       "models": MODELS}
    (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the test split's format; no question naming a model (it is shown before the vote)
    chats = [json.loads(line) for line in (tiny_data_dir / "test.jsonl").read_text().splitlines()]
    chats = [c for c in chats if not MODEL_IDS.search(json.dumps(c["messages"][:-1]))][:6]
    assert len(chats) >= 3
    (scratch / "test.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicetune.tools.arena", "--port", str(port), "--params", "params.yaml",
         "--votes", "arena/votes.jsonl", "--test", "test.jsonl", "--base", str(tiny["base"]),
         "--adapters", str(tiny["adapters"]), "--fused", str(tiny["fused"]),
         "--preference-adapters", str(tiny["preference_adapters"]), "--system", PERSONA,
         "--max-tokens", str(MAX_TOKENS), "--no-check"],
        cwd=scratch, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    output, listening = [], threading.Event()

    def read_output():  # all of it, so that the pipe never fills up
        for line in proc.stdout:
            output.append(line)
            if line.startswith("arena: http://"):
                listening.set()
    threading.Thread(target=read_output, daemon=True).start()
    server = RealServer(f"http://127.0.0.1:{port}", proc, scratch / "arena/votes.jsonl",
                        {c["messages"][-2]["content"]: c["messages"][-1]["content"] for c in chats},
                        output)
    try:
        deadline = time.monotonic() + 180
        while not listening.wait(0.2):
            assert proc.poll() is None, f"the arena exited ({proc.returncode}):\n{server.log()}"
            assert time.monotonic() < deadline, f"the arena never said where it listens:\n{server.log()}"
        while True:  # it prints its address just before uvicorn starts listening
            try:
                httpx.get(f"{server.url}/api/config", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, server.log()
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


# Stand-in answers for the in-process app: a random model cannot be made to write HTML, or to
# wait. Each model writes a different one, in pieces that cut through the tags.
STAND_IN_ANSWERS = {
    name: f'{name.upper()[::-1]} said <img src=x onerror="window.__pwned=\'{name}\'"> and '
          f"<script>window.__pwned='{name}'</script><b>bold?</b> & done."
    for name in MODELS}
STAND_IN_QUESTIONS = [{"messages": [{"role": "system", "content": PERSONA},
                                    {"role": "user", "content": f"Stand-in question {i}?"}],
                       "question": f"Stand-in question {i}?", "reference": f"Reference {i}."}
                      for i in range(3)]


class StandIn:
    """A stand-in for the model (answer_fn): writes STAND_IN_ANSWERS[name] in 5-character
    pieces; with ``gate`` cleared it writes the first half, sets ``halfway`` and holds the rest
    back until the gate is set again."""

    def __init__(self):
        self.gate, self.halfway = threading.Event(), threading.Event()
        self.gate.set()
        self.calls: list[str] = []

    def __call__(self, name, messages, settings, write):
        self.calls.append(name)
        text = STAND_IN_ANSWERS[name]
        half = len(text) // 2
        for i in range(0, half, 5):
            write(text[i:min(i + 5, half)])
        self.halfway.set()
        assert self.gate.wait(120), "the test never released the stand-in's answer"
        for i in range(half, len(text), 5):
            write(text[i:i + 5])
        return {"prediction": text, "tokens": len(text) // 5, "finish_reason": "stop"}


@pytest.fixture
def stand_in_server(tmp_path):
    """The arena's app (create_app) with the stand-in generator, served by uvicorn in a thread."""
    import uvicorn

    from voicetune.serve.arena_app import ArenaConfig, create_app
    from voicetune.serve.arena_engine import Engine
    from voicetune.serve.chat import Settings

    stand_in = StandIn()
    config = ArenaConfig(models=MODELS, chat_models=MODELS, system=PERSONA,
                         settings=Settings(max_tokens=MAX_TOKENS), temperature=0.7,
                         votes=tmp_path / "votes.jsonl", weights=None, questions=STAND_IN_QUESTIONS)
    engine = Engine(stand_in)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", stand_in, config
    stand_in.gate.set()
    server.should_exit = True
    thread.join(15)
    engine.close()


# ------------------------------------------------------------------ the real server
def test_blind_battles_each_vote_kind_and_the_reveal(real_server, browser, tmp_path):
    page, rec = open_arena(browser, real_server.url)
    for number, choice in enumerate(CHOICES):
        battle = new_battle(page, "New battle: a test question" if number == 0 else "Next battle")
        wait_for_answers(page, real_server.log)
        stream = rec.stream_of(battle)
        assert rec.wait_for(lambda r: r.method == "POST" and r.url.endswith("/api/battles")
                            and battle in (r.body or ""), "the new battle").status == 200
        question = page.locator("#battle-question").text_content()
        assert page.locator("#battle-source").text_content() == "(from the test split)"
        answers = {side: page.locator(f"#answer-{side.lower()}").text_content() for side in "AB"}
        # the page shows exactly what was streamed, and both answers are there
        assert answers == {side: streamed_text(stream.body, side) for side in "AB"}
        assert all(answers.values()), answers
        assert sse_events(stream.body)[-1][0] == "end"
        assert_nothing_names_a_model(rec)
        assert_arena_dom_names_no_model(page)

        a, b = vote_and_read_reveal(page, choice)
        expect(page.locator("#reveal-reference")).to_be_visible()
        assert page.locator("#reference").text_content() == real_server.references[question]
        real_server.acknowledged[battle] = {
            "vote": choice, "model_a": a, "model_b": b, "question": question, "from_test": True,
            "answer_a": answers["A"], "answer_b": answers["B"],
            "reference": real_server.references[question], "system": PERSONA}
        # the ratings table: every battling model (arena.models), with or without votes yet
        expect_ratings(page, len(real_server.acknowledged))
        if number == 0:
            shot = tmp_path / "arena.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            if os.environ.get("ARENA_SCREENSHOT"):
                shutil.copy(shot, os.environ["ARENA_SCREENSHOT"])

    # a typed question full of HTML is shown as typed, and nothing in it runs
    page.locator("#battle-typed").fill(XSS)
    battle = new_battle(page, "Ask it")
    expect(page.locator("#battle-question")).to_have_text(XSS)
    assert page.locator("#battle-question").text_content() == XSS
    assert page.locator("#battle-source").text_content() == "(typed)"
    wait_for_answers(page, real_server.log)
    rec.stream_of(battle)
    assert_nothing_names_a_model(rec)
    assert_arena_dom_names_no_model(page)
    a, b = vote_and_read_reveal(page, "A")
    expect(page.locator("#reveal-reference")).to_be_hidden()  # no author's answer to a typed one
    real_server.acknowledged[battle] = {"vote": "A", "model_a": a, "model_b": b, "question": XSS,
                                        "from_test": False, "reference": None}
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#battle-question *").count() == 0  # text, not elements
    assert not any(url.endswith("/x") for url in rec.urls())  # the <img> was never an image

    check_votes_file(real_server.votes, real_server.acknowledged)
    expect_ratings(page, len(real_server.acknowledged))
    assert rec.errors == []
    page.context.close()


def test_chat_tab_answers_with_two_models(real_server, browser):
    page, rec = open_arena(browser, real_server.url)
    page.get_by_role("button", name="Chat", exact=True).click()
    expect(page.locator("#tab-chat")).to_be_visible()
    expect(page.locator("#tab-arena")).to_be_hidden()
    page.locator('#chat-models input[value="base"]').uncheck()
    page.locator('#chat-models input[value="lora"]').check()
    page.locator('#chat-models input[value="fused"]').check()
    expect(page.locator(".chat-column")).to_have_count(2)
    message = "What knot do you trust most?"
    page.locator("#chat-input").fill(message)
    page.get_by_role("button", name="Send", exact=True).click()
    for name in ("lora", "fused"):
        column = page.locator(f"#chat-{name}")
        wait_for_chat_answer(column, real_server.log)
        assert column.locator("h2").text_content() == name
        assert column.locator(".turn.user").all_text_contents() == [message]
        stream = rec.wait_for(lambda r: r.url.endswith("/api/chat")
                              and json.loads(r.post_data)["model"] == name, f"{name}'s chat answer")
        events = sse_events(stream.body)
        assert events[-1][0] == "end" and events[-1][1]["tokens"] >= 1
        answer = column.locator(".turn.assistant").all_text_contents()
        assert answer == [streamed_text(stream.body)] and answer[0], answer
    expect(page.locator("#chat-send")).to_be_enabled()
    assert rec.errors == []
    page.context.close()


def test_sixteen_battles_and_four_chats_at_once(real_server):
    """Concurrent clients (httpx, threads): every request answered, every vote written once."""
    import httpx

    def battle(i):
        with httpx.Client(base_url=real_server.url, timeout=300) as client:
            created = client.post("/api/battles", json={})
            created.raise_for_status()
            battle_id = created.json()["battle"]
            with client.stream("GET", f"/api/battles/{battle_id}/stream") as r:
                r.raise_for_status()
                events = sse_events(r.read().decode())
            assert events[-1][0] == "end", events[-1]
            choice = CHOICES[i % len(CHOICES)]
            voted = client.post(f"/api/battles/{battle_id}/vote", json={"vote": choice})
            voted.raise_for_status()
            assert voted.json()["duplicate"] is False
            reveal = voted.json()["reveal"]
            return battle_id, {"vote": choice, "model_a": reveal["A"], "model_b": reveal["B"],
                               "answer_a": texts(events, "A"),
                               "answer_b": texts(events, "B")}

    def chat(i):
        with httpx.Client(base_url=real_server.url, timeout=300) as client:
            body = {"model": MODELS[i % len(MODELS)],
                    "messages": [{"role": "user", "content": f"Chat {i}: tea or coffee?"}]}
            with client.stream("POST", "/api/chat", json=body) as r:
                r.raise_for_status()
                events = sse_events(r.read().decode())
            assert events[-1][0] == "end", events[-1]

    def attempt(job):
        kind, i = job
        try:
            return kind, (battle if kind == "battle" else chat)(i), None
        except Exception as err:  # counted, and shown below
            return kind, None, f"{kind} {i}: {type(err).__name__}: {err}"

    jobs = [("battle", i) for i in range(16)] + [("chat", i) for i in range(4)]
    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(attempt, jobs))
    seconds = time.perf_counter() - started
    errors = [err for _, _, err in results if err]
    requests = 16 * 3 + 4  # a battle: create, stream, vote; a chat: one streamed request
    print(f"\narena concurrency: {requests} requests (16 battles: create + stream + vote, "
          f"4 chats) from {len(jobs)} threads at once: {len(errors)} errors, {seconds:.1f} s")
    assert errors == [], "\n".join(errors) + "\n" + real_server.log()
    for kind, value, _ in results:
        if kind == "battle":
            real_server.acknowledged[value[0]] = value[1]
    check_votes_file(real_server.votes, real_server.acknowledged)


def test_no_battle_side_can_be_looked_up_in_the_chat_tab(real_server):
    """Battles sample (arena.temperature), each with a seed of its own: the chat tab's answer
    to the battle's question (greedy, eval.*: the evaluate stage's prediction) is neither
    side's, and battles on one question do not repeat each other. The vote records the
    battle's seed and temperature."""
    import httpx

    question = "Which knot would you teach first?"
    sides, battles = [], []
    with httpx.Client(base_url=real_server.url, timeout=300) as client:
        for _ in range(4):
            battle_id = client.post("/api/battles", json={"question": question}).json()["battle"]
            with client.stream("GET", f"/api/battles/{battle_id}/stream") as r:
                events = sse_events(r.read().decode())
            assert events[-1][0] == "end", events[-1]
            reveal = client.post(f"/api/battles/{battle_id}/vote", json={"vote": "tie"}).json()["reveal"]
            real_server.acknowledged[battle_id] = {"vote": "tie", "model_a": reveal["A"],
                                                   "model_b": reveal["B"]}
            battles.append(battle_id)
            sides += [(reveal[side], texts(events, side)) for side in "AB"]
        greedy = {}
        for model in sorted({m for m, _ in sides}):
            with client.stream("POST", "/api/chat", json={
                    "model": model, "messages": [{"role": "user", "content": question}]}) as r:
                events = sse_events(r.read().decode())
            assert events[-1][0] == "end", events[-1]
            greedy[model] = texts(events)
    for model, answer in sides:
        assert answer != greedy[model], f"a battle's {model} answer is the chat tab's: {answer!r}"
    by_model = {}
    for model, answer in sides:
        by_model.setdefault(model, []).append(answer)
    assert any(len(answers) >= 2 for answers in by_model.values())
    for model, answers in by_model.items():
        assert len(set(answers)) == len(answers), f"two battles' {model} answers are the same"
    votes = {v["battle_id"]: v for v in read_votes(real_server.votes)[0]}
    settings = [votes[b]["settings"] for b in battles]
    assert len({s["seed"] for s in settings}) == len(battles)
    temperature = yaml.safe_load((ROOT / "params.yaml").read_text())["arena"]["temperature"]
    assert all(s["temperature"] == temperature > 0 for s in settings)


def test_kill_9_mid_vote_leaves_the_votes_whole(real_server):
    """Last: it kills the server. Votes sent at once, and the server killed (SIGKILL) as soon as
    the first is acknowledged: every line of votes.jsonl parses, every acknowledged vote (these
    and all before) is there, once, and nothing but votes that were sent."""
    import httpx

    with httpx.Client(base_url=real_server.url, timeout=300) as client:
        ready = []
        for _ in range(6):
            battle_id = client.post("/api/battles", json={}).json()["battle"]
            with client.stream("GET", f"/api/battles/{battle_id}/stream") as r:
                assert sse_events(r.read().decode())[-1][0] == "end"
            ready.append(battle_id)
    first_ack, acked = threading.Event(), {}

    def vote(battle_id):
        try:
            reply = httpx.post(f"{real_server.url}/api/battles/{battle_id}/vote",
                               json={"vote": "tie"}, timeout=60)
        except httpx.HTTPError:
            return  # killed before it answered: the vote may or may not be written
        if reply.status_code == 200:
            acked[battle_id] = {"vote": "tie", "model_a": reply.json()["reveal"]["A"],
                                "model_b": reply.json()["reveal"]["B"]}
            first_ack.set()
    threads = [threading.Thread(target=vote, args=(b,)) for b in ready]
    for t in threads:
        t.start()
    assert first_ack.wait(60), real_server.log()
    real_server.proc.send_signal(signal.SIGKILL)
    assert real_server.proc.wait(30) == -signal.SIGKILL
    for t in threads:
        t.join(60)
    real_server.acknowledged.update(acked)
    print(f"\narena kill -9: {len(acked)} of {len(ready)} votes acknowledged before the kill, "
          f"{len(real_server.votes.read_text().splitlines())} lines in votes.jsonl")

    lines = real_server.votes.read_bytes().decode("utf-8").splitlines()
    votes = [json.loads(line) for line in lines]  # every line whole
    assert read_votes(real_server.votes) == (votes, [])
    ids = [v["battle_id"] for v in votes]
    assert len(ids) == len(set(ids))  # once each
    assert set(real_server.acknowledged) <= set(ids)  # nothing acknowledged is lost
    assert set(ids) <= set(real_server.acknowledged) | set(ready)  # nothing invented
    for vote in votes:
        if vote["battle_id"] in real_server.acknowledged:
            want = real_server.acknowledged[vote["battle_id"]]
            assert {k: vote[k] for k in want} == want


# ------------------------------------------------------------------ the app with a stand-in
def test_a_rewrite_battle_is_labelled_and_shows_its_draft(stand_in_server, browser):
    """A rewrite row of the test split: the page says "Rewrite in the author's voice", shows
    the draft (not the instruction before it), and after the vote the author's original."""
    from voicetune.data.rewrite import INSTRUCTION, user_message

    url, stand_in, config = stand_in_server
    draft, original = "The bowline holds. It unties easily.", "Bowline. Holds fast, lets go kindly."
    config.questions = [{"messages": [{"role": "system", "content": PERSONA},
                                      {"role": "user", "content": user_message(draft)}],
                         "question": user_message(draft), "reference": original, "task": "rewrite"}]
    page, rec = open_arena(browser, url)
    battle = new_battle(page, "New battle: a test question")
    expect(page.locator("#battle-kind")).to_have_text("Rewrite in the author's voice")
    assert page.locator("#battle-question").text_content() == draft
    assert INSTRUCTION not in page.locator("#battle").inner_text()
    assert page.locator("#battle-source").text_content() == "(from the test split)"
    wait_for_answers(page)
    assert_nothing_names_a_model(rec)
    assert_arena_dom_names_no_model(page)
    a, b = vote_and_read_reveal(page, "A")
    expect(page.locator("#reference-label")).to_have_text("The author's original")
    assert page.locator("#reference").text_content() == original
    check_votes_file(config.votes, {battle: {"vote": "A", "task": "rewrite", "model_a": a,
                                             "model_b": b, "question": user_message(draft),
                                             "reference": original}})

    page.locator("#battle-typed").fill("Which knot first?")  # the next battle is a question again
    new_battle(page, "Ask it")
    expect(page.locator("#battle-kind")).to_have_text("Question")
    assert page.locator("#battle-question").text_content() == "Which knot first?"
    assert rec.errors == []
    page.context.close()


def test_generated_html_is_shown_as_text_in_battles_and_chat(stand_in_server, browser):
    url, stand_in, config = stand_in_server
    page, rec = open_arena(browser, url)
    page.locator("#battle-typed").fill(XSS)
    new_battle(page, "Ask it")
    wait_for_answers(page)
    answers = [page.locator(f"#answer-{s}").text_content() for s in "ab"]
    assert set(answers) <= set(STAND_IN_ANSWERS.values()) and answers[0] != answers[1]
    assert page.locator("#battle-question").text_content() == XSS
    for box in ("#battle-question", "#answer-a", "#answer-b"):
        assert page.locator(f"{box} *").count() == 0  # text nodes only, no <img> or <script>
    a, b = vote_and_read_reveal(page, "B")
    assert answers == [STAND_IN_ANSWERS[a], STAND_IN_ANSWERS[b]]

    page.get_by_role("button", name="Chat", exact=True).click()
    page.locator('#chat-models input[value="fused"]').check()
    page.locator('#chat-models input[value="dpo"]').check()
    expect(page.locator(".chat-column")).to_have_count(len(MODELS))
    page.locator("#chat-input").fill(XSS)
    page.get_by_role("button", name="Send", exact=True).click()
    for name in MODELS:
        column = page.locator(f"#chat-{name}")
        wait_for_chat_answer(column)
        assert column.locator(".turn.user").all_text_contents() == [XSS]
        assert column.locator(".turn.assistant").all_text_contents() == [STAND_IN_ANSWERS[name]]
        assert column.locator(".turn *").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert not any(url.endswith("/x") for url in rec.urls())  # no <img> was ever made
    assert rec.errors == []
    page.context.close()


def test_a_reload_mid_battle_resumes_it_and_a_double_click_votes_once(stand_in_server, browser):
    url, stand_in, config = stand_in_server
    page, rec = open_arena(browser, url)
    stand_in.gate.clear()  # A writes half its answer, then waits
    battle = new_battle(page, "New battle: a test question")
    assert stand_in.halfway.wait(30)
    question = page.locator("#battle-question").text_content()
    halves = re.compile("|".join(re.escape(a[:len(a) // 2]) for a in STAND_IN_ANSWERS.values()))
    expect(page.locator("#status-a")).to_have_text("writing...")
    expect(page.locator("#answer-a")).to_have_text(halves)  # A's first half, and no more yet
    expect(page.get_by_role("button", name="A is better")).to_be_disabled()

    page.reload()
    expect(page.locator("#battle-question")).to_have_text(question)
    expect(page.locator("#answer-a")).to_have_text(halves)  # what was written before the reload
    expect(page.get_by_role("button", name="A is better")).to_be_disabled()
    stand_in.gate.set()
    wait_for_answers(page)
    assert rec.wait_for(lambda r: r.url.endswith(f"/api/battles/{battle}"), "the resumed battle")
    after_reload = page.locator("#answer-a").text_content(), page.locator("#answer-b").text_content()
    assert len(stand_in.calls) == 2  # A and B, once each: the reload generated nothing again

    a, b = vote_and_read_reveal(page, "tie", click="dblclick")
    rec.wait_for(lambda r: r.url.endswith("/vote"), "the vote's reply")
    assert [r.url for r in rec.responses if r.url.endswith("/vote")] == [
        f"{url}/api/battles/{battle}/vote"]  # the double click sent one vote
    assert after_reload == (STAND_IN_ANSWERS[a], STAND_IN_ANSWERS[b])  # whole, nothing twice
    votes = check_votes_file(config.votes, {battle: {"vote": "tie", "model_a": a, "model_b": b,
                                                     "question": question}})
    assert votes[0]["answer_a"] == STAND_IN_ANSWERS[a]

    page.reload()  # a voted battle comes back as its reveal; voting again is not offered
    expect(page.locator("#reveal-names")).to_have_text(
        f"A was {a}, B was {b}: {VOTE_WORDS['tie']}.")
    expect(page.get_by_role("button", name="Tie")).to_be_disabled()
    check_votes_file(config.votes, {battle: {"vote": "tie"}})
    assert rec.errors == []
    page.context.close()
