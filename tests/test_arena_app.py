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

from voicetune.arena_app import MAX_QUESTION_CHARS, ArenaConfig, create_app
from voicetune.arena_engine import Engine
from voicetune.chat import Settings
from voicetune.votes import read_votes

# the answers name nobody: a leak can only come from the app
ANSWERS = {"base": "Well, knots are useful.\nTie them well.",
           "lora": "Aye. A bowline, every time, lass.",
           "fused": "A bowline. Always the bowline."}
MODEL_IDS = re.compile(r"\b(base|lora|fused)\b", re.I)
QUESTIONS = [{"messages": [{"role": "system", "content": "persona"},
                           {"role": "user", "content": f"Test question {i}?"}],
              "question": f"Test question {i}?", "reference": f"The author's answer {i}."}
             for i in range(5)]


class FakeGenerator:
    """answer_fn: the model's fixed answer in 3-character pieces; ``gate`` holds answers back."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.calls = []

    def __call__(self, name, messages, settings, write):
        self.calls.append((name, messages))
        self.gate.wait(10)
        text = ANSWERS[name]
        for i in range(0, len(text), 3):
            write(text[i:i + 3])
        return {"prediction": text, "tokens": len(text) // 3, "finish_reason": "stop"}


@pytest.fixture
def arena(tmp_path):
    fake = FakeGenerator()
    config = ArenaConfig(models=["base", "lora", "fused"], chat_models=["base", "lora"],
                         system="You are Captain Tilly Brask.",
                         settings=Settings(max_tokens=20, temperature=0.0, seed=0),
                         votes=tmp_path / "arena/votes.jsonl", adapter="abc123.dir",
                         questions=QUESTIONS, ratings=lambda votes: {"rows": [], "n": len(votes)})
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
    assert {vote["model_a"], vote["model_b"]} <= set(ANSWERS) and vote["model_a"] != vote["model_b"]
    assert vote["answer_a"] == ANSWERS[vote["model_a"]] and vote["answer_b"] == ANSWERS[vote["model_b"]]
    assert vote["adapter"] == "abc123.dir" and vote["preference_adapter"] is None and vote["system"] == config.system
    assert vote["settings"] == {"max_tokens": 20, "temperature": 0.0, "seed": 0, "repetition_penalty": None}
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
