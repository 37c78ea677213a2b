"""`python -m voicetune.tools.chat`: driven as a person would, in a pseudo-terminal (pexpect), on a
tiny random model with adapters and a fused copy; plus the properties it rests on: a greedy
chat answer is the evaluate stage's answer, and base-via-switched-off-adapters is the base."""
import io
import os
import re
import shutil
import subprocess
import signal
import sys
from pathlib import Path

import pexpect
import pytest
import yaml

from voicetune.core.params import load_params
from voicetune.data import rewrite
from voicetune.serve.chat import Settings
from voicetune.tools.chat import DRAFT_PROMPT, Chat
from voicetune.models.loader import ChatModels
from voicetune.models.fusion import load_float32
from voicetune.models.generation import generate_batched, prompt_tokens

from tests.conftest import PERSONA, ROOT
from tests.harness.models import MANY_QUESTIONS, tiny_model_set

SETTINGS = dict(max_tokens=10, temperature=0.0, seed=0, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory) -> dict:
    """Paths of a tiny base model, adapters that change its answers, and their fused model."""
    return tiny_model_set(tiny_model_dir, tmp_path_factory.mktemp("chat"))


def evaluate_answers(path, adapters, conversations, settings=SETTINGS):
    """What the evaluate stage's path gives: its own model load, all prompts in one batch."""
    model, tokenizer, _ = load_float32(path, adapters)
    prompts = [prompt_tokens(tokenizer, messages) for messages in conversations]
    tokens = [[] for _ in prompts]
    answers = generate_batched(model, tokenizer, prompts, batch_size=48,
                               on_token=lambda i, t: tokens[i].append(t), **settings)
    return answers, tokens


def ask(question, history=()):
    return [{"role": "system", "content": PERSONA}, *history, {"role": "user", "content": question}]


def test_base_via_switched_off_adapters_is_the_plain_base_model(tiny):
    models = ChatModels(tiny["base"], tiny["adapters"], tiny["fused"], check=False, log=lambda _: None)
    lora_model, tokenizer = models.get("lora")
    base_model, _ = models.get("base")
    assert base_model is lora_model  # one copy of the weights serves both
    assert "fused" not in models._copies  # fused is loaded only when asked for
    conversations = [ask(q) for q in MANY_QUESTIONS]
    prompts = [prompt_tokens(tokenizer, c) for c in conversations]

    def tokens_of(model):
        out = [[] for _ in prompts]
        generate_batched(model, tokenizer, prompts, batch_size=48, on_token=lambda i, t: out[i].append(t),
                         **SETTINGS)
        return out

    switched_off = tokens_of(models.get("base")[0])
    plain_base = evaluate_answers(tiny["base"], None, conversations)[1]
    assert switched_off == plain_base  # token for token
    switched_on = tokens_of(models.get("lora")[0])
    assert switched_on == evaluate_answers(tiny["base"], tiny["adapters"], conversations)[1]
    assert switched_on != switched_off  # the switch really switches
    assert tokens_of(models.get("base")[0]) == plain_base  # and back again


def test_fused_and_dpo_share_the_fused_copy_switching_the_preference_adapters(tiny):
    models = ChatModels(tiny["base"], tiny["adapters"], tiny["fused"], check=False, log=lambda _: None,
                        preference_adapters=tiny["preference_adapters"])
    dpo_model, tokenizer = models.get("dpo")
    assert models.get("fused")[0] is dpo_model and "base" not in models._copies
    conversations = [ask(q) for q in MANY_QUESTIONS[:6]]
    prompts = [prompt_tokens(tokenizer, c) for c in conversations]

    def tokens_of(model):
        out = [[] for _ in prompts]
        generate_batched(model, tokenizer, prompts, batch_size=48, on_token=lambda i, t: out[i].append(t),
                         **SETTINGS)
        return out

    plain_fused = evaluate_answers(tiny["fused"], None, conversations)[1]
    assert tokens_of(models.get("fused")[0]) == plain_fused
    dpo = tokens_of(models.get("dpo")[0])
    assert dpo == evaluate_answers(tiny["fused"], tiny["preference_adapters"], conversations)[1]
    assert dpo != plain_fused


def test_greedy_chat_answers_are_the_evaluate_stage_answers(tiny):
    models = ChatModels(tiny["base"], tiny["adapters"], tiny["fused"], check=False, log=lambda _: None)
    out = io.StringIO()
    chat = Chat(models, PERSONA, Settings(**SETTINGS), ["base", "lora", "fused"], out=out)
    questions = MANY_QUESTIONS[:4]
    first = []
    for question in questions:
        chat.command("/reset")
        first.append(chat.ask(question))
    follow_up = chat.ask("And then?")  # a second turn: the history is in the prompt
    for name, adapters in (("base", None), ("lora", tiny["adapters"]), ("fused", None)):
        path = tiny["fused"] if name == "fused" else tiny["base"]
        expected, _ = evaluate_answers(path, adapters, [ask(q) for q in questions])
        assert [a[name] for a in first] == expected, name
        history = [{"role": "user", "content": questions[-1]},
                   {"role": "assistant", "content": expected[-1]["prediction"]}]
        [again], _ = evaluate_answers(path, adapters, [ask("And then?", history)])
        assert follow_up[name] == again, name
        # the streamed text, under its heading, is the answer itself
        assert f"[{name}]\n{again['prediction']}" in out.getvalue()
    assert first[0]["base"] != first[0]["lora"]


# --- in a pseudo-terminal, as a person would use it ------------------------------------------

def spawn(tiny, *args, cwd=ROOT) -> pexpect.spawn:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "voicetune.tools.chat", "--base", str(tiny["base"]),
                                           "--adapters", str(tiny["adapters"]), "--fused",
                                           str(tiny["fused"]), "--no-check", "--system", PERSONA, *args],
                          cwd=str(cwd), env=env, encoding="utf-8", timeout=60, dimensions=(40, 1000),
                          # Ctrl-C as in a user's terminal, even when the tests run as a
                          # background job (which a shell starts with SIGINT ignored)
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact("you> ")
    return child


def answers_in(transcript: str, names) -> dict[str, str]:
    """The answer under each ``[name]`` heading of one round's output."""
    text = transcript.replace("\r", "")
    found = {}
    for name in names:
        start = text.index(f"[{name}]\n") + len(name) + 3
        end = min([text.index(f"\n[{n}]\n", start) for n in names if f"\n[{n}]\n" in text[start:]]
                  + [len(text)])
        found[name] = LIMIT_NOTE.sub("", text[start:end].removesuffix("\n").removesuffix("\n"))
    return found


# what the chat appends to an answer or a rewrite cut at its length limit
LIMIT_NOTE = re.compile(r" \[hit the (?:limit: /max|rewrite limit of \d+ tokens: --rewrite-max-tokens) "
                        r"to raise it\]$")


def round_of(child, question) -> str:
    child.sendline(question)
    child.expect_exact("you> ")
    return child.before


def test_compare_answers_with_each_model_under_its_heading(tiny):
    names = ["base", "lora", "fused"]
    child = spawn(tiny, "--compare", ",".join(names), "--max-tokens", "10")
    question = "Why reef early?"
    first = answers_in(round_of(child, question), names)
    for name, adapters in (("base", None), ("lora", tiny["adapters"]), ("fused", None)):
        path = tiny["fused"] if name == "fused" else tiny["base"]
        [expected], _ = evaluate_answers(path, adapters, [ask(question)])
        assert first[name] == expected["prediction"].replace("\r", ""), name
    second = answers_in(round_of(child, question), names)
    assert second != first  # the history changed the prompt
    child.sendline("/reset")
    child.expect_exact("[history cleared]")
    child.expect_exact("you> ")
    assert answers_in(round_of(child, question), names) == first  # a fresh conversation again
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_keeps_the_session_and_ctrl_d_quits(tiny):
    child = spawn(tiny, "--model", "lora", "--max-tokens", "1000000")
    child.sendline("Why reef early?")
    child.expect_exact("[lora]")
    child.expect(r"\S{20}")  # it is streaming
    child.sendintr()
    child.expect_exact("[stopped: this exchange is forgotten]", timeout=20)
    child.expect_exact("you> ")
    child.sendline("/max 6")
    child.expect_exact("[max tokens: 6]")
    child.expect_exact("you> ")
    # the stopped exchange is not in the history: the answer is a fresh conversation's
    answer = answers_in(round_of(child, "Tea or coffee?"), ["lora"])["lora"]
    [expected], _ = evaluate_answers(tiny["base"], tiny["adapters"], [ask("Tea or coffee?")],
                                     dict(SETTINGS, max_tokens=6))
    assert answer == expected["prediction"].replace("\r", "")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_in_chat_commands(tiny):
    child = spawn(tiny, "--model", "base", "--max-tokens", "7")
    for line, reply in (("/help", "/reset"), ("/max", "[max tokens: 7]"), ("/max 0", "whole number"),
                        ("/temp 0.7", "[temperature: 0.7, seed 0]"), ("/temp -1", "number >= 0"),
                        ("/model lora,nope", "give one or more of base, lora, fused"),
                        ("/model base,lora", "[answering: base, lora]"), ("/bogus", "unknown command"),
                        ("/system", PERSONA)):
        child.sendline(line)
        child.expect_exact(reply)
        child.expect_exact("you> ")
    child.sendintr()  # Ctrl-C at the prompt only clears the line
    child.expect_exact("(Ctrl-D or /quit to leave)")
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --- missing or stale models: DVC is asked --------------------------------------------------

DVC_YAML = """stages:
  base_model:
    cmd: mkdir -p models && cp -R src/base models/base
    deps: [src/base]
    params: [model.source]
    outs: [models/base]
  train:
    cmd: cp -R src/adapters models/adapters
    deps: [models/base, src/adapters]
    params: [lora]
    outs: [models/adapters]
  fuse:
    cmd: cp -R src/fused models/fused
    deps: [models/base, models/adapters, src/fused]
    params: [fuse]
    outs: [models/fused]
"""


def chat_in(project, *args, stdin="/quit\n"):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "voicetune.tools.chat", *args], cwd=project, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_missing_or_stale_models_say_what_to_run(tiny, tmp_path):
    """A DVC project whose stages copy the tiny models into models/: the chat refuses models
    that are missing, or that DVC says a params change has made stale, naming the stage."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    for name, path in tiny.items():
        shutil.copytree(path, project / "src" / name)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    (project / "dvc.yaml").write_text(DVC_YAML)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)

    missing = chat_in(project, "--model", "base")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "models/base missing" in missing.stderr and "dvc repro base_model" in missing.stderr

    subprocess.run([*dvc, "repro", "-q"], cwd=project, check=True, capture_output=True)
    fresh = chat_in(project, "--compare", "base,lora,fused")
    assert fresh.returncode == 0, fresh.stderr
    assert "chatting with base, lora, fused" in fresh.stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["lora"]["rank"] += 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = chat_in(project)  # lora by default
    assert stale.returncode == 1 and "Traceback" not in stale.stderr
    assert "models/adapters would be stale" in stale.stderr
    assert "train: deps params.yaml: lora modified" in stale.stderr
    assert "dvc repro train" in stale.stderr
    # the base model is still current, and a stale model asked for in the chat ends nothing
    in_chat = chat_in(project, "--model", "base", stdin="/model fused\n/model\n/quit\n")
    assert in_chat.returncode == 0, in_chat.stderr
    assert "models/fused would be stale" in in_chat.stdout and "[answering: base]" in in_chat.stdout
    assert chat_in(project, "--no-check").returncode == 0  # --no-check skips DVC
    # on a terminal, asking DVC draws none of its progress bars over the chat
    child = pexpect.spawn(sys.executable, ["-m", "voicetune.tools.chat", "--model", "base"], cwd=str(project),
                          env=dict(os.environ, PYTHONPATH=str(ROOT), TERM="dumb"), encoding="utf-8", timeout=60)
    child.expect_exact("you> ")
    assert "chatting with base" in child.before and "Collecting files" not in child.before
    child.sendeof()
    child.expect(pexpect.EOF)


# --- /rewrite: a draft in the author's voice, the rewrite task's standalone turn ---------------

MODELS = {"base": None, "lora": "adapters"}  # a model's name: its adapters in the tiny set


def expected_rewrites(tiny, draft, max_tokens, names=("lora",)) -> dict[str, dict]:
    """What the evaluate stage predicts for the rewrite sample of ``draft``, greedily."""
    out = {}
    for name in names:
        adapters = tiny[MODELS[name]] if MODELS[name] else None
        [out[name]], _ = evaluate_answers(tiny["base"], adapters, [rewrite.messages(PERSONA, draft)],
                                          dict(SETTINGS, max_tokens=max_tokens))
    return out


def prediction(answer: dict) -> str:
    return answer["prediction"].replace("\r", "")


def test_rewrite_a_pasted_draft_in_the_training_format_outside_the_conversation(tiny, tmp_path):
    """/rewrite, a two-line draft, ".": every active model rewrites it with the rewrite task's
    own prompt and eval.rewrite_max_tokens (not --max-tokens), reading no history and leaving
    none behind."""
    names = ["base", "lora"]
    rewrite_limit = 24  # params.yaml's, lowered to keep the test short
    params = load_params(ROOT / "params.yaml")
    params["eval"]["rewrite_max_tokens"] = rewrite_limit
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    child = spawn(tiny, "--compare", ",".join(names), "--max-tokens", "7",
                  "--params", str(tmp_path / "params.yaml"))
    question = "Why reef early?"
    round_of(child, question)  # the conversation has a history now
    child.sendline("/rewrite")
    child.expect_exact(DRAFT_PROMPT)
    draft = "The wind picked up after noon.\nWe took in a reef and reached port before dark."
    for line in [*draft.split("\n"), "."]:
        child.sendline(line)
    child.expect_exact("you> ")
    got = answers_in(child.before, names)
    expected = expected_rewrites(tiny, draft, rewrite_limit, names)
    for name in names:
        assert got[name] == prediction(expected[name]), name
    # the rewrite is longer than the answers' limit: --max-tokens does not apply to it
    assert len(expected["lora"]["prediction"]) > len(expected_rewrites(tiny, draft, 7)["lora"]["prediction"])
    # a wrong prompt would show: no instruction, or the chat's history in front of it
    adapters = tiny["adapters"]
    [bare], _ = evaluate_answers(tiny["base"], adapters, [ask(draft)], dict(SETTINGS, max_tokens=rewrite_limit))
    [in_chat], _ = evaluate_answers(tiny["base"], adapters, [ask(rewrite.user_message(draft), [
        {"role": "user", "content": question}, {"role": "assistant", "content": got["lora"]}])],
        dict(SETTINGS, max_tokens=rewrite_limit))
    assert prediction(bare) != got["lora"] and prediction(in_chat) != got["lora"]
    # the history holds the first exchange only: the next answer is the one without the rewrite
    follow = "Tea or coffee?"
    after = answers_in(round_of(child, follow), names)
    for name in names:
        adapters = tiny[MODELS[name]] if MODELS[name] else None
        [first], _ = evaluate_answers(tiny["base"], adapters, [ask(question)], dict(SETTINGS, max_tokens=7))
        history = [{"role": "user", "content": question}, {"role": "assistant", "content": first["prediction"]}]
        [expected_after], _ = evaluate_answers(tiny["base"], adapters, [ask(follow, history)],
                                               dict(SETTINGS, max_tokens=7))
        assert after[name] == prediction(expected_after), name
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_rewrite_on_one_line_ctrl_d_ends_a_draft_and_an_empty_draft_is_refused(tiny):
    child = spawn(tiny, "--model", "lora", "--max-tokens", "6", "--rewrite-max-tokens", "9")
    child.sendline("/help")
    child.expect_exact("/rewrite [TEXT]")
    child.expect_exact("you> ")
    # an empty draft, ended by "." or by Ctrl-D, is refused and nothing is generated
    for blank in ([], ["   "]):
        child.sendline("/rewrite")
        child.expect_exact(DRAFT_PROMPT)
        for line in blank:
            child.sendline(line)
        if blank:
            child.sendeof()
        else:
            child.sendline(".")
        child.expect_exact("[empty draft: nothing to rewrite]")
        child.expect_exact("you> ")
        assert "[lora]" not in child.before
    # the draft on the command's own line: no paste prompt
    text = "We left at dawn and the fog lifted by ten."
    transcript = round_of(child, f"/rewrite {text}")
    assert DRAFT_PROMPT not in transcript
    assert answers_in(transcript, ["lora"])["lora"] == prediction(expected_rewrites(tiny, text, 9)["lora"])
    # a pasted draft ended by Ctrl-D
    child.sendline("/rewrite")
    child.expect_exact(DRAFT_PROMPT)
    child.sendline(text)
    child.sendeof()
    child.expect_exact("you> ")
    assert answers_in(child.before, ["lora"])["lora"] == prediction(expected_rewrites(tiny, text, 9)["lora"])
    # no rewrite entered the history: the first question gets a fresh conversation's answer
    answer = answers_in(round_of(child, "Tea or coffee?"), ["lora"])["lora"]
    [expected], _ = evaluate_answers(tiny["base"], tiny["adapters"], [ask("Tea or coffee?")],
                                     dict(SETTINGS, max_tokens=6))
    assert answer == prediction(expected)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_rewrite_and_keeps_the_session(tiny):
    child = spawn(tiny, "--model", "lora", "--max-tokens", "6", "--rewrite-max-tokens", "1000000")
    child.sendline("/rewrite The fog lifted by ten.")
    child.expect_exact("[lora]")
    child.expect(r"\S{20}")  # it is streaming
    child.sendintr()
    child.expect_exact("[stopped]", timeout=20)
    child.expect_exact("you> ")
    answer = answers_in(round_of(child, "Tea or coffee?"), ["lora"])["lora"]
    [expected], _ = evaluate_answers(tiny["base"], tiny["adapters"], [ask("Tea or coffee?")],
                                     dict(SETTINGS, max_tokens=6))
    assert answer == prediction(expected)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
