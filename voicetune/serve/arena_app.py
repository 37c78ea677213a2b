"""The arena's web app (FastAPI): a chat tab, blind battles, votes, and the ratings table.

Why FastAPI and a small hand-written page rather than Gradio: the blind test must be
airtight, and here every byte the browser gets is ours to check. A battle is known to the
browser only by a random id; the models behind "A" and "B" live in the server's memory and
in no response (HTML, JSON, event stream, element id) until the vote is written. "A" is
always generated before "B", whatever the models are, so not even the order in which the
answers arrive depends on who is behind them. All text reaches the page as JSON and is put
into it with ``textContent``: a ``<script>`` in a question or an answer is shown, never run.

Nor can a side be looked up: battles sample (``arena.temperature``), each with a seed of its
own drawn at random and kept in the server until the vote, so a battle's answer is neither the
greedy one that the chat tab (eval.*, as ``make chat``) and ``data/eval/`` show, nor what
another battle on the same question said.

Battles live in memory: a reloaded page picks its battle up again (answers so far, or the
reveal if it was voted on); a vote is written whole (``votes.append_vote``: locked, fsynced)
before the page is told, once per battle, however often the button is clicked; a battle the
server no longer knows (it restarted) is refused rather than guessed.

Two tasks battle: a question answered (``qa``), and a draft rewritten in the author's voice
(``rewrite``: the test split's rewrite rows, or a typed message that is the rewrite instruction
and a draft, ``rewrite.user_message``). Both sides of a battle answer the same ``messages``, the
training format of either task; a rewrite is cut at ``rewrite_max_tokens`` (eval.*), a Q&A
answer at the battles' ``max_tokens``. The page is told the task and, for a rewrite, the draft
alone, and shows it as the text to rewrite; the vote records the task.

What one page can make the single generation worker do is bounded: a battle left for a new
one, or forgotten as the oldest of MAX_BATTLES, has its answers stopped; a question is at most
MAX_QUESTION_CHARS, a chat's whole history at most MAX_CHAT_CHARS in MAX_CHAT_MESSAGES.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from voicetune.data.rewrite import draft_of
from voicetune.serve.arena_engine import Engine
from voicetune.data.votes import CHOICES, SCHEMA, append_vote, battle_weights, read_votes

PAGE = Path(__file__).with_name("arena_page")
MAX_QUESTION_CHARS = 2000
# a chat's whole history (every turn, each model's own answers included): about 2,000 tokens,
# so that one long conversation holds the single generation worker no longer than a few
# questions would
MAX_CHAT_CHARS = 4 * MAX_QUESTION_CHARS
MAX_CHAT_MESSAGES = 41  # 20 exchanges and the new question
MAX_BATTLES = 1000  # in memory; the oldest are forgotten first, their answers stopped
SIDES = ("A", "B")


@dataclass
class ArenaConfig:
    models: list[str]                  # the models that battle (two different ones per battle)
    chat_models: list[str]             # what the chat tab offers
    system: str                        # the persona prompt
    settings: object                   # chat.Settings: the chat tab's decoding (eval.*, make chat)
    temperature: float                 # battles sample at it (arena.temperature), own seed each
    votes: Path                        # data/arena/votes.jsonl
    weights: dict | None               # votes.weights_identity: each weight file's md5 in dvc.lock
    questions: list[dict]              # test split: {"messages", "question", "reference", "task"}
    ratings: Callable[[list[dict]], dict] | None = None  # votes -> the ratings table
    rewrite_max_tokens: int | None = None  # a rewrite battle's length limit (eval.rewrite_max_tokens;
                                           # None: settings.max_tokens, as a Q&A battle's)


@dataclass
class Battle:
    id: str
    question: str
    from_test: bool
    test_index: int | None
    reference: str | None
    messages: list
    sides: dict                        # {"A": model id, "B": model id}: never sent before the vote
    settings: object                   # its decoding: sampled, with its own seed (not sent either)
    kind: str = "qa"                   # the task: qa, or rewrite (``question``: the instruction
                                       # and a draft)
    text: dict = field(default_factory=lambda: {"A": [], "B": []})
    finished: dict = field(default_factory=lambda: {"A": False, "B": False})
    error: str | None = None
    status: dict = field(default_factory=dict)   # side -> ("queued", n) / ("generating", None)
    vote: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def answer(self, side: str) -> str:
        return "".join(self.text[side])

    def done(self) -> bool:
        return all(self.finished.values()) or self.error is not None

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def draft(self) -> str | None:
        """A rewrite battle's draft (its question without the instruction); None for Q&A."""
        if self.kind != "rewrite":
            return None
        found = draft_of(self.question)
        return self.question if found is None else found

    def public(self) -> dict:
        """What the page may know: no model id before the vote. ``question`` is the user's turn
        as the models got it; a rewrite battle's ``draft`` is what the page shows."""
        state = {"battle": self.id, "task": self.kind, "question": self.question,
                 "draft": self.draft(), "from_test": self.from_test,
                 "answers": {s: self.answer(s) for s in SIDES}, "finished": dict(self.finished),
                 "error": self.error, "voted": self.vote}
        if self.vote:
            state["reveal"] = self.reveal()
        return state

    def reveal(self) -> dict:
        return {"A": self.sides["A"], "B": self.sides["B"], "vote": self.vote,
                "reference": self.reference}


class NewBattle(BaseModel):
    question: str | None = Field(None, description="typed by the person; none: a test question")
    abandon: str | None = Field(None, description="the battle this page leaves (its answers stop)")


class VoteIn(BaseModel):
    vote: str


class ChatIn(BaseModel):
    model: str
    messages: list[dict]


def check_question(text: str) -> str:
    text = text.strip()
    if not text:
        raise HTTPException(400, "Type a question first (it is empty).")
    if len(text) > MAX_QUESTION_CHARS:
        raise HTTPException(400, f"That question is {len(text):,} characters long; the arena takes "
                                 f"at most {MAX_QUESTION_CHARS:,}. Shorten it.")
    return text


def create_app(engine: Engine, config: ArenaConfig, rng: random.Random | None = None) -> FastAPI:
    rng = rng or random.SystemRandom()
    battles: OrderedDict[str, Battle] = OrderedDict()
    app = FastAPI(title="voicetune arena", docs_url=None, redoc_url=None, openapi_url=None)

    def battle_of(battle_id: str) -> Battle:
        battle = battles.get(battle_id)
        if battle is None:
            raise HTTPException(404, "This battle is unknown to the server (it restarted, or the "
                                     "battle is long over): start a new one.")
        return battle

    async def generate(battle: Battle) -> None:
        """A first, then B: the order never depends on the models behind them."""
        try:
            await generate_sides(battle)
        except asyncio.CancelledError:
            battle.error = "This battle was left for a new one."
            battle.notify()
            raise

    async def generate_sides(battle: Battle) -> None:
        for side in SIDES:
            async for kind, value in engine.answer(battle.sides[side], battle.messages, battle.settings):
                if kind == "queued":
                    battle.status[side] = {"state": "queued", "ahead": value}
                elif kind == "start":
                    battle.status[side] = {"state": "generating"}
                elif kind == "text":
                    battle.text[side].append(value)
                elif kind == "done":
                    battle.finished[side] = True
                    battle.status[side] = {"state": "done"}
                elif kind == "error":
                    battle.error = "An answer failed; the server log says why. Start a new battle."
                    print(f"arena: battle {battle.id}: {value}", flush=True)
                battle.notify()
                if kind == "error":
                    return

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE / "index.html")

    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/api/config")
    async def get_config():
        return {"chat_models": config.chat_models, "system": config.system,
                "test_questions": len(config.questions), "max_question_chars": MAX_QUESTION_CHARS,
                "max_chat_chars": MAX_CHAT_CHARS, "settings": vars(config.settings),
                "battle_temperature": config.temperature,
                "test_rewrites": sum(q.get("task") == "rewrite" for q in config.questions),
                "rewrite_max_tokens": config.rewrite_max_tokens or config.settings.max_tokens}

    @app.post("/api/battles")
    async def new_battle(body: NewBattle):
        if body.abandon and (old := battles.get(body.abandon)) and old.task and not old.done():
            old.task.cancel()
        if body.question is None:
            if not config.questions:
                raise HTTPException(400, "No test questions (data/processed/test.jsonl is empty): "
                                         "type a question.")
            index = rng.randrange(len(config.questions))
            q = config.questions[index]
            question, messages, reference = q["question"], q["messages"], q["reference"]
            task = q.get("task", "qa")
        else:
            question, index, reference = check_question(body.question), None, None
            messages = [{"role": "system", "content": config.system},
                        {"role": "user", "content": question}]
            # typed as the rewrite task's user turn (the instruction, then a draft): a rewrite
            task = "qa" if draft_of(question) is None else "rewrite"
        first, second = rng.sample(config.models, 2)
        settings = dataclasses.replace(config.settings, temperature=config.temperature,
                                       seed=rng.randrange(2 ** 31))
        if task == "rewrite" and config.rewrite_max_tokens is not None:
            settings = dataclasses.replace(settings, max_tokens=config.rewrite_max_tokens)
        battle = Battle(secrets.token_urlsafe(12), question, index is not None, index, reference,
                        messages, {"A": first, "B": second}, settings, kind=task)
        battles[battle.id] = battle
        while len(battles) > MAX_BATTLES:
            _, forgotten = battles.popitem(last=False)
            if forgotten.task and not forgotten.done():
                forgotten.task.cancel()  # nobody can vote on it any more: stop its answers
        battle.task = asyncio.create_task(generate(battle))
        return battle.public()

    @app.get("/api/battles/{battle_id}")
    async def get_battle(battle_id: str):
        return battle_of(battle_id).public()

    @app.get("/api/battles/{battle_id}/stream", response_class=EventSourceResponse)
    async def stream_battle(battle: Battle = Depends(battle_of), a: int = 0, b: int = 0):
        """The answers as they come: "text" events (side, text) from character offsets ``a``
        and ``b`` (what a reloaded page already shows), "status" (each side's queue place),
        then "end" (or "failed")."""
        sent = {"A": a, "B": b}
        last_status = None
        while True:
            changed = battle.changed
            # read before sending: the yields below let the answers move on, and the end
            # must not be announced before the last text went out
            done, error = battle.done(), battle.error
            for side in SIDES:
                answer = battle.answer(side)
                if len(answer) > sent[side]:
                    yield ServerSentEvent(event="text", data={"side": side, "text": answer[sent[side]:]})
                    sent[side] = len(answer)
            status = json.dumps(battle.status, sort_keys=True)
            if status != last_status:
                yield ServerSentEvent(event="status", data=battle.status)
                last_status = status
            if error:
                yield ServerSentEvent(event="failed", data={"message": error})
                return
            if done:
                yield ServerSentEvent(event="end", data={"finished": battle.finished})
                return
            await changed.wait()

    @app.post("/api/battles/{battle_id}/vote")
    async def vote(battle_id: str, body: VoteIn):
        battle = battle_of(battle_id)
        if body.vote not in CHOICES:
            raise HTTPException(422, f"'{body.vote}' is not a vote: {', '.join(CHOICES)}")
        async with battle.lock:  # a double click waits here, then finds the vote made
            if battle.vote is not None:
                return {"duplicate": True, **battle.public()}
            if battle.error or not all(battle.finished.values()):
                raise HTTPException(409, "Both answers must be complete before you vote.")
            record = {
                "schema": SCHEMA, "battle_id": battle.id,
                "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "task": battle.kind,  # qa or rewrite; a vote without it (older) is qa
                "question": battle.question, "from_test": battle.from_test,
                "test_index": battle.test_index, "reference": battle.reference,
                "model_a": battle.sides["A"], "model_b": battle.sides["B"],
                "answer_a": battle.answer("A"), "answer_b": battle.answer("B"),
                "vote": body.vote, "system": battle.messages[0]["content"]
                if battle.messages and battle.messages[0]["role"] == "system" else config.system,
                "settings": vars(battle.settings),
                "weights": battle_weights(battle.sides.values(), config.weights),
                # schema 1's fields, for readers that know only them
                "adapter": (config.weights or {}).get("adapters"),
                "preference_adapter": (config.weights or {}).get("preference_adapters")
                if "dpo" in battle.sides.values() else None}
            await asyncio.to_thread(append_vote, config.votes, record)  # durable before we say so
            battle.vote = body.vote
        return {"duplicate": False, **battle.public()}

    @app.get("/api/ratings")
    async def ratings():
        votes, warnings = await asyncio.to_thread(read_votes, config.votes)
        table = await asyncio.to_thread(config.ratings, votes) if config.ratings else None
        return {"votes": len(votes), "skipped_lines": len(warnings), "file": str(config.votes),
                "table": table}

    def valid_chat(body: ChatIn) -> ChatIn:
        """Checked before the event stream starts (a refusal is then a plain HTTP error)."""
        if body.model not in config.chat_models:
            raise HTTPException(422, f"'{body.model}' is not one of {', '.join(config.chat_models)}")
        if not body.messages or body.messages[-1].get("role") != "user":
            raise HTTPException(422, "The conversation must end with the user's question.")
        turns = [{"role": m.get("role"), "content": str(m.get("content", ""))} for m in body.messages]
        if any(t["role"] not in ("user", "assistant") for t in turns):
            raise HTTPException(422, "Messages are user or assistant turns.")
        check_question(turns[-1]["content"])
        chars = sum(len(t["content"]) for t in turns)
        if chars > MAX_CHAT_CHARS or len(turns) > MAX_CHAT_MESSAGES:
            raise HTTPException(413, f"This conversation is {chars:,} characters in {len(turns)} "
                                     f"messages; the arena answers at most {MAX_CHAT_CHARS:,} "
                                     f"characters in {MAX_CHAT_MESSAGES} messages. Press Reset "
                                     "to start a new one.")
        return ChatIn(model=body.model, messages=turns)

    @app.post("/api/chat", response_class=EventSourceResponse)
    async def chat(body: ChatIn = Depends(valid_chat)):
        """One model's answer to a conversation (the page keeps each model's history)."""
        messages = [{"role": "system", "content": config.system}, *body.messages]
        started = time.perf_counter()
        async for kind, value in engine.answer(body.model, messages, config.settings):
            if kind == "queued":
                yield ServerSentEvent(event="status", data={"state": "queued", "ahead": value})
            elif kind == "start":
                yield ServerSentEvent(event="status", data={"state": "generating"})
            elif kind == "text":
                yield ServerSentEvent(event="text", data={"text": value})
            elif kind == "done":
                yield ServerSentEvent(event="end", data={
                    "finish_reason": value["finish_reason"], "tokens": value["tokens"],
                    "seconds": round(time.perf_counter() - started, 2)})
            else:
                print(f"arena: chat with {body.model}: {value}", flush=True)
                yield ServerSentEvent(event="failed", data={"message": "The answer failed; the "
                                                            "server log says why."})

    return app
