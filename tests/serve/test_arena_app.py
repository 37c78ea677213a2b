"""The arena's web app, through HTTP (FastAPI's TestClient), with a stand-in generator.

The stand-in writes a fixed answer per model, piece by piece, so every response can be read
for a leak: no model id may reach the browser before the vote, in any response. The real
model, the real server and a real browser are in test_arena_browser.py."""
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from voicetune.serve import arena_app
from voicetune.data import votes as votes_module
from voicetune.serve.arena_app import MAX_QUESTION_CHARS, ArenaConfig, create_app
from voicetune.serve.arena_engine import Cancelled, Engine
from voicetune.serve.chat import Settings
from voicetune.models.registry import NAMES
from voicetune.data.votes import read_votes
from voicetune.data.rewrite import user_message

# the answers name nobody: a leak can only come from the app
ANSWERS = {"base": "Well, knots are useful.\nTie them well.",
           "lora": "Aye. A bowline, every time, lass.",
           "fused": "A bowline. Always the bowline.",
           "dpo": "The bowline, and I'll not hear otherwise."}
# every model the project can run (any of them may battle), not a list kept by hand here
MODEL_IDS = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b", re.I)
WEIGHTS = {"base": "b45e.dir", "adapters": "abc123.dir", "fused": "f05e.dir",
           "preference_adapters": "d90a.dir"}
TEMPERATURE = 0.7
QUESTIONS = [{"messages": [{"role": "system", "content": "persona"},
                           {"role": "user", "content": f"Test question {i}?"}],
              "question": f"Test question {i}?", "reference": f"The author's answer {i}."}
             for i in range(5)]
MAX_TOKENS = 20
REWRITE_MAX_TOKENS = 33  # not the Q&A battles' MAX_TOKENS: which one an answer got is seen
DRAFT = "The captain says the bowline is the first knot to learn. It holds and it unties."
ORIGINAL = "Bowline first, always. It holds like a promise and lets go when you ask it to."
# a rewrite row of the test split, as battle_questions reads it
REWRITE = {"messages": [{"role": "system", "content": "persona"},
                        {"role": "user", "content": user_message(DRAFT)}],
           "question": user_message(DRAFT), "reference": ORIGINAL, "task": "rewrite"}


class FakeGenerator:
    """answer_fn: the model's fixed answer in 3-character pieces; ``gate`` holds all but the
    first piece back. An answer stopped by its page going away is listed in ``stopped``."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.calls = []
        self.settings = []  # the decoding settings of each call
        self.stopped = []   # (model, pieces written) of each answer stopped before its end

    def __call__(self, name, messages, settings, write):
        self.calls.append((name, messages))
        self.settings.append(settings)
        text = ANSWERS[name]
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        written = 0
        try:
            for piece in pieces:
                write(piece)
                written += 1
                if written == 1:
                    self.gate.wait(10)
        except Cancelled:
            self.stopped.append((name, written))
            raise
        return {"prediction": text, "tokens": len(pieces), "finish_reason": "stop"}


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


@pytest.fixture
def arena(tmp_path):
    fake = FakeGenerator()
    config = ArenaConfig(models=list(NAMES), chat_models=["base", "lora"],
                         system="You are Captain Tilly Brask.",
                         settings=Settings(max_tokens=MAX_TOKENS, temperature=0.0, seed=0),
                         temperature=TEMPERATURE, votes=tmp_path / "arena/votes.jsonl",
                         weights=WEIGHTS, questions=QUESTIONS,
                         ratings=lambda votes: {"rows": [], "n": len(votes)},
                         rewrite_max_tokens=REWRITE_MAX_TOKENS)
    engine = Engine(fake)
    with TestClient(create_app(engine, config, rng=random.Random(0))) as client:
        yield client, fake, config
    engine.close()


def stream(client, battle_id, a=0, b=0):
    """The raw event stream of a battle until its end, and the events parsed."""
    with client.stream("GET", f"/api/battles/{battle_id}/stream", params={"a": a, "b": b}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields.get("event"), json.loads(fields["data"])))
    return raw, events


def texts(events):
    out = {"A": "", "B": ""}
    for name, data in events:
        if name == "text":
            out[data["side"]] += data["text"]
    return out


def test_nothing_names_a_model_before_the_vote_and_the_reveal_is_right(arena):
    client, _, config = arena
    orders = set()
    for _ in range(12):
        created = client.post("/api/battles", json={})
        raw, events = stream(client, created.json()["battle"])
        state = client.get(f"/api/battles/{created.json()['battle']}")
        seen = created.text + raw + state.text
        assert not MODEL_IDS.search(seen), seen  # not in JSON, keys, event names or ids
        assert events[-1][0] == "end"
        answers = texts(events)
        voted = client.post(f"/api/battles/{created.json()['battle']}/vote", json={"vote": "A"}).json()
        reveal = voted["reveal"]
        assert answers == {"A": ANSWERS[reveal["A"]], "B": ANSWERS[reveal["B"]]}
        assert reveal["A"] != reveal["B"]
        question = created.json()["question"]
        assert reveal["reference"] == next(q["reference"] for q in QUESTIONS if q["question"] == question)
        orders.add((reveal["A"], reveal["B"]))
    assert len(orders) >= 4  # sides and pairs are drawn at random
    page = client.get("/").text + client.get("/static/arena.js").text
    assert not re.search(r"\b(lora|fused)\b", page)  # the page itself hard-codes no model


def test_a_vote_is_one_complete_line_written_once_however_often_it_is_clicked(arena):
    client, fake, config = arena
    battle = client.post("/api/battles", json={"question": "  Do you like <b>knots</b>?  "}).json()
    assert battle["question"] == "Do you like <b>knots</b>?" and not battle["from_test"]
    stream(client, battle["battle"])
    with ThreadPoolExecutor(8) as pool:  # a double (octuple) click
        replies = list(pool.map(lambda _: client.post(f"/api/battles/{battle['battle']}/vote",
                                                      json={"vote": "tie"}), range(8)))
    assert all(r.status_code == 200 for r in replies)
    assert sorted(r.json()["duplicate"] for r in replies) == [False] + [True] * 7
    votes, warnings = read_votes(config.votes)
    assert warnings == [] and len(votes) == 1
    vote = votes[0]
    assert vote["battle_id"] == battle["battle"] and vote["vote"] == "tie"
    assert vote["question"] == "Do you like <b>knots</b>?" and vote["from_test"] is False
    assert vote["task"] == "qa" and battle["task"] == "qa" and battle["draft"] is None
    assert {vote["model_a"], vote["model_b"]} <= set(ANSWERS) and vote["model_a"] != vote["model_b"]
    assert vote["answer_a"] == ANSWERS[vote["model_a"]] and vote["answer_b"] == ANSWERS[vote["model_b"]]
    made_of = votes_module.MADE_OF
    assert vote["weights"] == {w: WEIGHTS[w] for m in (vote["model_a"], vote["model_b"]) for w in made_of[m]}
    assert vote["adapter"] == "abc123.dir" and vote["system"] == config.system
    assert vote["preference_adapter"] == ("d90a.dir" if "dpo" in (vote["model_a"], vote["model_b"]) else None)
    # the battle's own decoding: sampled, its seed drawn for it; the one its answers were made with
    assert vote["settings"] == {"max_tokens": 20, "temperature": TEMPERATURE,
                                "seed": vote["settings"]["seed"], "repetition_penalty": None}
    assert vars(fake.settings[-1]) == vote["settings"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", vote["time"])
    # the typed question was asked with the persona, as a single turn
    assert fake.calls[-1][1] == [{"role": "system", "content": config.system},
                                 {"role": "user", "content": "Do you like <b>knots</b>?"}]


def test_votes_that_cannot_count_are_refused(arena):
    client, fake, config = arena
    assert client.post("/api/battles/nosuchbattle/vote", json={"vote": "A"}).status_code == 404
    fake.gate.clear()  # answers held back: the battle is still running
    battle = client.post("/api/battles", json={}).json()["battle"]
    early = client.post(f"/api/battles/{battle}/vote", json={"vote": "A"})
    assert early.status_code == 409 and "complete" in early.json()["detail"]
    fake.gate.set()
    stream(client, battle)
    assert client.post(f"/api/battles/{battle}/vote", json={"vote": "C"}).status_code == 422
    assert not config.votes.exists()  # nothing written for any of them


@pytest.mark.parametrize("question, says", [("   ", "empty"),
                                            ("x" * (MAX_QUESTION_CHARS + 1), "at most")])
def test_empty_or_overlong_questions_are_refused_with_a_reason(arena, question, says):
    client, fake, _ = arena
    reply = client.post("/api/battles", json={"question": question})
    assert reply.status_code == 400 and says in reply.json()["detail"]
    assert fake.calls == []


def test_a_reloaded_page_resumes_its_battle_where_it_was(arena):
    client, fake, _ = arena
    battle = client.post("/api/battles", json={}).json()["battle"]
    _, events = stream(client, battle)
    full = texts(events)
    # reload: the page gets the state, shows it, and follows the stream from there
    state = client.get(f"/api/battles/{battle}").json()
    assert state["answers"] == full and state["voted"] is None and "reveal" not in state
    cut = {"A": 5, "B": 7}
    _, events = stream(client, battle, a=cut["A"], b=cut["B"])
    assert texts(events) == {s: full[s][cut[s]:] for s in "AB"}
    client.post(f"/api/battles/{battle}/vote", json={"vote": "both_bad"})
    after = client.get(f"/api/battles/{battle}").json()  # reloaded after the vote: the reveal
    assert after["voted"] == "both_bad" and set(after["reveal"]) == {"A", "B", "vote", "reference"}


def test_leaving_a_battle_for_a_new_one_stops_its_answers(arena):
    client, fake, _ = arena
    fake.gate.clear()
    old = client.post("/api/battles", json={}).json()["battle"]
    new = client.post("/api/battles", json={"abandon": old}).json()["battle"]
    fake.gate.set()
    _, events = stream(client, old)
    assert events[-1][0] == "failed" and "left" in events[-1][1]["message"]
    _, events = stream(client, new)
    assert events[-1][0] == "end"
    assert client.post(f"/api/battles/{old}/vote", json={"vote": "A"}).status_code == 409


def test_chat_streams_one_models_answer_to_the_whole_history(arena):
    client, fake, config = arena
    history = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Ahoy."},
               {"role": "user", "content": "Knots?"}]
    with client.stream("POST", "/api/chat", json={"model": "lora", "messages": history}) as r:
        raw = "".join(r.iter_text())
    events = [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("data: ", 1)[1]))
              for b in raw.strip().split("\n\n")]
    assert "".join(d["text"] for e, d in events if e == "text") == ANSWERS["lora"]
    assert events[-1][0] == "end" and events[-1][1]["finish_reason"] == "stop"
    assert fake.calls[-1] == ("lora", [{"role": "system", "content": config.system}, *history])
    assert client.post("/api/chat", json={"model": "fused", "messages": history}).status_code == 422
    assert client.post("/api/chat", json={"model": "base", "messages": history[:2]}).status_code == 422


def test_many_tabs_at_once_are_queued_and_all_answered(arena):
    client, fake, config = arena
    fake.gate.clear()
    battles = [client.post("/api/battles", json={}).json()["battle"] for _ in range(6)]
    queued = {}
    with client.stream("GET", f"/api/battles/{battles[-1]}/stream") as r:
        for line in r.iter_lines():  # the last battle waits behind the others' answers
            if line.startswith("data: ") and '"queued"' in line:
                queued = json.loads(line[6:])
                break
    assert queued["A"]["ahead"] >= 1
    fake.gate.set()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: stream(client, b)[1], battles))
    assert all(events[-1][0] == "end" for events in results)
    assert len(fake.calls) == 12


def test_ratings_come_from_the_votes_file(arena):
    client, _, config = arena
    assert client.get("/api/ratings").json() == {"votes": 0, "skipped_lines": 0, "file": str(config.votes),
                                                 "table": {"rows": [], "n": 0}}
    battle = client.post("/api/battles", json={}).json()["battle"]
    stream(client, battle)
    client.post(f"/api/battles/{battle}/vote", json={"vote": "B"})
    with open(config.votes, "a") as f:
        f.write('{"battle_id": "torn", "vo')  # a half-written line: skipped, counted
    assert client.get("/api/ratings").json() == {"votes": 1, "skipped_lines": 1, "file": str(config.votes),
                                                 "table": {"rows": [], "n": 1}}


# ------------------------------------------------------------------ issue 19: trust, second pass
def test_the_leak_scanner_knows_every_model_the_project_can_run():
    for name in NAMES:  # dpo too: it can battle
        assert MODEL_IDS.search(f"A was {name}."), name
    assert not MODEL_IDS.search("a bowline, a baseline, a dpoint")


def test_each_battle_samples_with_a_seed_of_its_own_and_the_chat_tab_stays_greedy(arena):
    """Battles on one question between the same two models do not repeat each other, and are
    not what the chat tab (greedy, as the evaluate stage) answers: no side can be looked up."""
    client, fake, config = arena
    by_pair = {}
    for _ in range(7):  # 4 models make 6 pairs: two of 7 battles share one
        battle = client.post("/api/battles", json={"question": "Which knot first?"}).json()["battle"]
        stream(client, battle)
        reveal = client.post(f"/api/battles/{battle}/vote", json={"vote": "tie"}).json()["reveal"]
        by_pair.setdefault(frozenset((reveal["A"], reveal["B"])), []).append(battle)
    battle_settings = list(fake.settings)
    votes, _ = read_votes(config.votes)
    seeds = {v["battle_id"]: v["settings"]["seed"] for v in votes}
    assert len(set(seeds.values())) == 7  # one seed per battle, never reused
    assert any(len(ids) >= 2 for ids in by_pair.values())
    for ids in by_pair.values():
        assert len({seeds[i] for i in ids}) == len(ids)
    assert all(v["settings"]["temperature"] == TEMPERATURE > 0 for v in votes)
    # what each answer was generated with: the battle's temperature and seed, both sides alike
    assert [s.temperature for s in battle_settings] == [TEMPERATURE] * 14
    assert [s.seed for s in battle_settings] == [seeds[i] for i in seeds for _ in "AB"]
    # the chat tab decodes as make chat and the evaluate stage do: greedy, eval.seed
    with client.stream("POST", "/api/chat", json={
            "model": "lora", "messages": [{"role": "user", "content": "Which knot first?"}]}) as r:
        r.read()
    assert (fake.settings[-1].temperature, fake.settings[-1].seed) == (0.0, 0)
    assert config.settings.temperature == 0.0 and config.settings.seed == 0  # left as it was
    assert client.get("/api/config").json()["battle_temperature"] == TEMPERATURE


def test_a_battles_seed_stays_in_the_server_until_the_vote(arena):
    client, fake, _ = arena
    created = client.post("/api/battles", json={})
    raw, _ = stream(client, created.json()["battle"])
    seed = fake.settings[-1].seed
    state = client.get(f"/api/battles/{created.json()['battle']}")
    for seen in (created.text, raw, state.text):
        assert str(seed) not in seen and "seed" not in seen


def test_a_forgotten_battle_has_its_answers_stopped(arena, monkeypatch):
    """The oldest battle forgotten (MAX_BATTLES) stops generating: its answer ends at the next
    token (the stand-in is told so by ``write``), and its B is never started."""
    client, fake, _ = arena
    monkeypatch.setattr(arena_app, "MAX_BATTLES", 1)
    fake.gate.clear()  # A writes one piece, then waits
    old = client.post("/api/battles", json={}).json()["battle"]
    wait_until(lambda: len(fake.calls) == 1, "the old battle's A started")
    following = threading.Event()

    def follow():  # the old battle's page, still reading its stream
        with client.stream("GET", f"/api/battles/{old}/stream") as r:
            following.set()
            return "".join(r.iter_text())
    with ThreadPoolExecutor(1) as pool:
        followed = pool.submit(follow)
        assert following.wait(20)
        new = client.post("/api/battles", json={}).json()["battle"]  # the old one is forgotten
        try:
            raw = followed.result(timeout=20)
        finally:
            fake.gate.set()
    assert "event: failed" in raw
    wait_until(lambda: fake.stopped, "the old battle's answer stopped")
    assert fake.stopped == [(fake.calls[0][0], 1)]  # at the first token after the gate
    _, events = stream(client, new)
    assert events[-1][0] == "end"
    assert len(fake.calls) == 3  # the old A, the new A and B: the old B never started
    assert client.get(f"/api/battles/{old}").status_code == 404


@pytest.mark.parametrize("turns, size, says", [
    (10, 1000, "characters"),  # 10 exchanges of 1,000 characters each: every message is short
    (30, 1, "messages"),       # tiny, but 61 messages
])
def test_the_whole_chat_history_is_bounded(arena, turns, size, says):
    client, fake, _ = arena
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": "q" * size}, {"role": "assistant", "content": "a" * size}]
    history.append({"role": "user", "content": "And a short question?"})
    reply = client.post("/api/chat", json={"model": "lora", "messages": history})
    assert reply.status_code == 413, reply.text
    detail = reply.json()["detail"]
    assert f"at most {arena_app.MAX_CHAT_CHARS:,} characters in {arena_app.MAX_CHAT_MESSAGES} messages" in detail
    assert "Reset" in detail and says in detail
    assert fake.calls == []  # nothing reached the generation worker
    # within the bounds, it is answered
    fits = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a" * 100},
            {"role": "user", "content": "Knots?"}]
    with client.stream("POST", "/api/chat", json={"model": "lora", "messages": fits}) as r:
        assert r.status_code == 200 and "event: end" in "".join(r.iter_text())


# ------------------------------------------------------------------ the rewrite task
def run_battle(client, fake, body):
    """Create a battle, follow it to its end; (its state, the generator's calls for it and
    their settings: A's, then B's)."""
    before = len(fake.calls)
    created = client.post("/api/battles", json=body)
    assert created.status_code == 200, created.text
    raw, events = stream(client, created.json()["battle"])
    assert events[-1][0] == "end"
    assert not MODEL_IDS.search(created.text + raw), created.text + raw  # blind, as any battle
    return created.json(), fake.calls[before:], fake.settings[before:]


def test_a_rewrite_row_of_the_test_split_battles_as_a_rewrite(arena):
    """A test split of a Q&A row and a rewrite row: the next battle is drawn from both; a
    rewrite battle is labelled so, shows its draft, is answered from the rewrite prompt (the
    training format) with eval.rewrite_max_tokens, reveals the author's original, and its vote
    records the task and is counted by the ratings (the arena stage's own computation)."""
    from voicetune.serve.arena_ratings import ratings_fn

    client, fake, config = arena
    config.questions = [QUESTIONS[0], REWRITE]
    config.ratings = ratings_fn({"arena": {"adapter": "all", "models": ["base", "lora"],
                                           "rounds": 100, "seed": 0}}, None)
    assert client.get("/api/config").json()["test_rewrites"] == 1
    seen = {}
    for _ in range(12):
        battle, calls, settings = run_battle(client, fake, {})
        seen.setdefault(battle["task"], (battle, calls, settings))
    assert set(seen) == {"qa", "rewrite"}  # the rewrite row is drawn like any question

    battle, calls, settings = seen["rewrite"]
    assert battle["draft"] == DRAFT and battle["question"] == user_message(DRAFT)
    assert battle["from_test"] is True
    assert [messages for _, messages in calls] == [REWRITE["messages"]] * 2  # both sides alike
    assert [s.max_tokens for s in settings] == [REWRITE_MAX_TOKENS] * 2
    assert all(s.temperature == TEMPERATURE for s in settings)
    qa, qa_calls, qa_settings = seen["qa"]
    assert qa["draft"] is None and qa["question"] == QUESTIONS[0]["question"]
    assert [m for _, m in qa_calls] == [QUESTIONS[0]["messages"]] * 2
    assert [s.max_tokens for s in qa_settings] == [MAX_TOKENS] * 2  # Q&A keeps its limit

    voted = client.post(f"/api/battles/{battle['battle']}/vote", json={"vote": "A"}).json()
    assert voted["reveal"]["reference"] == ORIGINAL and voted["task"] == "rewrite"
    after = client.get(f"/api/battles/{battle['battle']}").json()  # a reload: still a rewrite
    assert after["task"] == "rewrite" and after["draft"] == DRAFT and after["voted"] == "A"
    client.post(f"/api/battles/{qa['battle']}/vote", json={"vote": "tie"})
    votes, warnings = read_votes(config.votes)
    assert warnings == [] and len(votes) == 2
    rewrite_vote, qa_vote = votes
    assert rewrite_vote["task"] == "rewrite" and qa_vote["task"] == "qa"
    # the user's turn as the models got it: what `arena export` pairs and training read
    assert rewrite_vote["question"] == user_message(DRAFT) and rewrite_vote["reference"] == ORIGINAL
    assert rewrite_vote["from_test"] is True and rewrite_vote["test_index"] == 1
    assert rewrite_vote["settings"]["max_tokens"] == REWRITE_MAX_TOKENS
    assert qa_vote["settings"]["max_tokens"] == MAX_TOKENS
    rewrite_models = {rewrite_vote["model_a"], rewrite_vote["model_b"]}
    assert rewrite_vote["answer_a"] == ANSWERS[rewrite_vote["model_a"]]
    table = client.get("/api/ratings").json()
    assert table["votes"] == 2
    battles = {row["model"]: row["battles"] for row in table["table"]["rows"]}
    for model in rewrite_models:
        assert battles[model] >= 1  # the rewrite vote is counted


def test_the_page_labels_a_rewrite_battle_and_shows_its_draft(arena):
    client, _, _ = arena
    script = client.get("/static/arena.js").text
    assert "Rewrite in the author's voice" in script and 'b.task === "rewrite"' in script
    assert "b.draft" in script
    assert 'id="battle-kind"' in client.get("/").text


def test_a_typed_rewrite_instruction_and_draft_is_a_rewrite_battle(arena):
    """Typed as the rewrite task's user turn, a message battles as a rewrite (its limit, its
    label); anything else typed is a question."""
    client, fake, config = arena
    typed = user_message("The knot held. The boat stayed put all night.")
    battle, calls, settings = run_battle(client, fake, {"question": typed})
    assert battle["task"] == "rewrite" and battle["draft"] == "The knot held. The boat stayed put all night."
    assert battle["from_test"] is False
    assert calls[0][1] == [{"role": "system", "content": config.system},
                           {"role": "user", "content": typed}]
    assert [s.max_tokens for s in settings] == [REWRITE_MAX_TOKENS] * 2
    client.post(f"/api/battles/{battle['battle']}/vote", json={"vote": "B"})
    [vote], _ = read_votes(config.votes)
    assert vote["task"] == "rewrite" and vote["reference"] is None and vote["question"] == typed
    question, _, settings = run_battle(client, fake, {"question": "Rewrite this knot guide?"})
    assert question["task"] == "qa" and [s.max_tokens for s in settings] == [MAX_TOKENS] * 2


def test_votes_written_before_the_task_was_recorded_still_read(arena, tmp_path):
    """An older vote (no ``task``) is still a vote, beside a new one with it."""
    client, fake, config = arena
    old = {"schema": 2, "battle_id": "old", "question": "Q?", "from_test": True, "vote": "tie",
           "model_a": "base", "model_b": "lora", "answer_a": "a", "answer_b": "b"}
    config.votes.parent.mkdir(parents=True)
    config.votes.write_text(json.dumps(old) + "\n")
    battle, _, _ = run_battle(client, fake, {"question": user_message("A plain draft.")})
    client.post(f"/api/battles/{battle['battle']}/vote", json={"vote": "A"})
    votes, warnings = read_votes(config.votes)
    assert warnings == [] and [v.get("task") for v in votes] == [None, "rewrite"]
    assert client.get("/api/ratings").json()["votes"] == 2


def test_the_server_battles_the_test_splits_rewrite_rows_with_eval_rewrite_max_tokens(
        tmp_path, monkeypatch):
    """``serve`` (make arena) reads the test split's rewrite rows as rewrite questions and
    gives the app eval.rewrite_max_tokens as their limit; --max-tokens stays the Q&A one.
    The models and uvicorn are stand-ins: only what the app is built with is looked at."""
    import socket

    import uvicorn

    from tests.conftest import ROOT
    from voicetune.core.params import load_params
    from voicetune.models import loader
    from voicetune.serve import arena_engine, arena_server

    rows = [{"messages": [*QUESTIONS[0]["messages"], {"role": "assistant", "content": "Aye."}]},
            {"messages": [*REWRITE["messages"], {"role": "assistant", "content": ORIGINAL}],
             "task": "rewrite"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = load_params(ROOT / "params.yaml")
    params["eval"]["rewrite_max_tokens"] = REWRITE_MAX_TOKENS
    built = {}

    class Models:
        def __init__(self, *args, **kwargs):
            pass

        def prepare(self, names):
            pass
    monkeypatch.setattr(loader, "ChatModels", Models)
    monkeypatch.setattr(arena_app, "create_app", lambda engine, config: built.setdefault("config", config))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.setattr(arena_engine, "Engine", lambda answer_fn: None)  # no worker thread left
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert arena_server.serve(params, host="127.0.0.1", port=port, votes=tmp_path / "votes.jsonl",
                              test=tmp_path / "test.jsonl", paths=dict.fromkeys(
                                  ("base", "adapters", "fused", "preference_adapters"), "x"),
                              max_tokens=MAX_TOKENS, check=False) == 0
    config = built["config"]
    assert config.rewrite_max_tokens == REWRITE_MAX_TOKENS
    assert config.settings.max_tokens == MAX_TOKENS
    assert [q["task"] for q in config.questions] == ["qa", "rewrite"]
    assert config.questions[1]["question"] == user_message(DRAFT)
    assert config.questions[1]["reference"] == ORIGINAL


def test_make_arena_passes_the_length_limits_to_the_server(monkeypatch):
    """`python -m voicetune.tools.arena --max-tokens N --rewrite-max-tokens M`: the Q&A battles'
    and the rewrite battles' limits reach serve() apart; without the flags, None (params.yaml's)."""
    from voicetune.tools import arena as tool
    from tests.conftest import ROOT

    calls = []
    monkeypatch.setattr(tool, "serve", lambda params, **kw: calls.append(kw) or 0)
    params = str(ROOT / "params.yaml")
    assert tool.main(["--params", params, "--max-tokens", "30", "--rewrite-max-tokens", "70"]) == 0
    assert tool.main(["--params", params]) == 0
    assert (calls[0]["max_tokens"], calls[0]["rewrite_max_tokens"]) == (30, 70)
    assert (calls[1]["max_tokens"], calls[1]["rewrite_max_tokens"]) == (None, None)
