"""The pairwise judge: both orders asked, only agreeing verdicts counted, position bias, the
reply cache shared with ingest, the stage's off switch; against a recording stand-in of an
OpenAI-compatible endpoint (tests/harness/fakes.FakeJudge: it answers by a rule the test sets
and records every request), and once through a real mlx_lm.server."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from voicetune.core.jsonl import dumps_jsonl
from voicetune.evaluate import judge
from voicetune.models import generators
from voicetune.models.generators import Reply, cached_complete

from tests.conftest import ROOT
from tests.harness.fakes import FakeJudge, serving

QUESTIONS = ["Why reef early?", "Tea or coffee?", "What was your worst storm?"]
# the author's answers all start "Aye,": a judge that knows the voice can tell them apart
ANSWERS = {
    "base": ["Reefing is a sailing technique used to reduce sail area.",
             "As an AI, I do not drink beverages.",
             "Storms can be dangerous for ships at sea."],
    "lora": ["Because the wind always rises faster than you think.",
             "Tea, strong, in a mug that has seen the Dogger Bank.",
             "Storms can be dangerous for ships at sea."],  # the same as base's: no call
    judge.AUTHOR: ["Aye, reef when you first think of it.", "Aye, tea. Always tea.",
                   "Aye, the night the Harwich boat lost her radar."],
}
EXAMPLES = ["Aye, the sea keeps no secrets.", "Aye, a bowline, every time."]


@pytest.fixture
def judge_server():
    FakeJudge.seen_auth, FakeJudge.seen_paths, FakeJudge.seen_messages = [], [], []
    with serving(FakeJudge) as url:
        yield url


def endpoint(url: str):
    return generators.Endpoint(url, "m", None, timeout=10.0, max_tokens=4, temperature=0.0, seed=0,
                               section="eval.judge")


def choose(monkeypatch, rule):
    monkeypatch.setattr(FakeJudge, "choose", staticmethod(rule))


def shown_pairs(messages: list) -> list[tuple[str, str]]:
    """(answer A, answer B) of every judge prompt the stand-in received."""
    out = []
    for chat in messages:
        text = chat[-1]["content"]
        a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
        b = text.split("\n\nAnswer B:\n", 1)[1].rsplit("\n\n", 1)[0]
        out.append((a, b))
    return out


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("reply, letter", [
    ("A", "A"), ("B.", "B"), ("**B**", "B"), ("Answer A.", "A"), ("I think B, not A", "B"),
    ("a", None), ("Both are fine.", None), ("", None), ("ABBA", None),
])
def test_the_first_standalone_letter_is_the_choice(reply, letter):
    assert judge.parse_letter(reply) == letter


def test_only_two_orders_that_agree_decide():
    assert judge.verdict("A", "B") == ("model", "agree")  # the model's answer both times
    assert judge.verdict("B", "A") == ("opponent", "agree")
    assert judge.verdict("A", "A") == ("tie", "disagree")  # the first position both times
    assert judge.verdict("B", "B") == ("tie", "disagree")
    assert judge.verdict("A", None) == ("tie", "unparseable")


# ------------------------------------------------------------------------------ a stand-in judge
def test_both_orders_are_asked_for_each_pair_and_identical_answers_make_no_call(
        tmp_path, judge_server, monkeypatch):
    choose(monkeypatch, lambda first, second: "B")
    records, metrics = judge.judge(QUESTIONS, ANSWERS, EXAMPLES, endpoint(judge_server), tmp_path)
    # lora_vs_base, base_vs_author, lora_vs_author; lora's third answer is base's: 8 pairs
    # judged, and the third of base_vs_author and lora_vs_author is one pair, asked once
    assert [r["contest"] for r in records] == ["lora_vs_base"] * 3 + ["base_vs_author"] * 3 + \
        ["lora_vs_author"] * 3
    asked = shown_pairs(FakeJudge.seen_messages)
    assert metrics["calls"] == 16 and len(asked) == metrics["asked"] == 14
    for r in records:
        x, y = ANSWERS[r["model"]][r["index"]], ANSWERS[r["opponent"]][r["index"]]
        if r["why"] == "identical":
            assert (x, y) not in asked and (y, x) not in asked and r["replies"] == []
        else:
            assert asked.count((x, y)) == 1 and asked.count((y, x)) == 1
    same = records[2]
    assert (same["why"], same["verdict"], same["letters"]) == ("identical", "tie", [])
    assert metrics["contests"]["lora_vs_base"]["identical"] == 1
    # the judge saw the examples and the question, not the persona
    prompt = FakeJudge.seen_messages[0]
    assert [m["role"] for m in prompt] == ["user"]
    assert all(e in prompt[0]["content"] for e in EXAMPLES) and QUESTIONS[0] in prompt[0]["content"]


def test_a_judge_that_always_answers_a_gives_only_ties(tmp_path, judge_server, monkeypatch):
    choose(monkeypatch, lambda first, second: "A")
    records, metrics = judge.judge(QUESTIONS, ANSWERS, EXAMPLES, endpoint(judge_server), tmp_path)
    assert {r["verdict"] for r in records} == {"tie"}
    assert {r["why"] for r in records} == {"disagree", "identical"}
    assert metrics["position_bias"] == 1.0 and metrics["consistency"] == 0.0
    assert metrics["unparseable"] == 0
    for c in metrics["contests"].values():
        assert (c["wins"], c["losses"], c["win_rate"]) == (0, 0, 0.5)
        assert c["position_bias"] == 1.0
    assert metrics["contests"]["base_vs_author"]["disagreements"] == 3
    assert metrics["contests"]["lora_vs_author"]["fooled"] == 0.0


def test_a_judge_that_recognises_the_author_decides_every_pair(tmp_path, judge_server, monkeypatch):
    choose(monkeypatch, lambda first, second: "A" if first.startswith("Aye") else
           "B" if second.startswith("Aye") else "I cannot tell.")
    records, metrics = judge.judge(QUESTIONS, ANSWERS, EXAMPLES, endpoint(judge_server), tmp_path)
    for name in ("base_vs_author", "lora_vs_author"):
        c = metrics["contests"][name]
        assert (c["wins"], c["ties"], c["losses"]) == (0, 0, 3)
        assert (c["win_rate"], c["fooled"], c["consistency"], c["position_bias"]) == (0.0, 0.0, 1.0, 0.5)
        assert c["win_rate_ci_high"] < 0.6
    assert {r["verdict"] for r in records if r["opponent"] == judge.AUTHOR} == {judge.AUTHOR}
    # between two answers that are not the author's it cannot say: unparseable, a tie
    c = metrics["contests"]["lora_vs_base"]
    assert (c["ties"], c["unparseable"], c["position_bias"]) == (3, 4, None)
    assert metrics["unparseable"] == 4
    # the battles of the length-controlled fit: a is the model, b its opponent
    fights = judge.battles(records, ANSWERS)
    assert {b["winner"] for b in fights if b["b"] == judge.AUTHOR} == {"b"}
    assert {b["winner"] for b in fights if b["b"] == "base"} == {"tie"}
    assert (fights[3]["a"], fights[3]["text_a"], fights[3]["text_b"]) == \
        ("base", ANSWERS["base"][0], ANSWERS[judge.AUTHOR][0])


def test_the_second_run_is_all_cache_hits(tmp_path, judge_server, monkeypatch):
    choose(monkeypatch, lambda first, second: "A" if first.startswith("Aye") else "B")
    first = judge.judge(QUESTIONS, ANSWERS, EXAMPLES, endpoint(judge_server), tmp_path)
    requests = len(FakeJudge.seen_messages)
    assert requests == 14 and len(list(tmp_path.glob("*.json"))) == 14
    ticks = []
    records, metrics = judge.judge(QUESTIONS, ANSWERS, EXAMPLES, endpoint(judge_server), tmp_path,
                                   progress=ticks.append)
    assert len(FakeJudge.seen_messages) == requests  # not one request more
    assert (metrics["asked"], metrics["cache_hits"]) == (0, 16) and records == first[0]
    assert sum(ticks) == 2 * 9
    # other examples are another question: asked again
    judge.judge(QUESTIONS, ANSWERS, EXAMPLES[:1], endpoint(judge_server), tmp_path)
    assert len(FakeJudge.seen_messages) == 2 * requests


class Scripted:
    """A generator whose replies are given: records every chat it is asked."""

    name = identity = "scripted"
    settings = {"max_tokens": 4}

    def __init__(self, text="A"):
        self.text, self.asked = text, []

    def complete(self, chats, progress=None):
        self.asked += chats
        return [Reply(self.text, "stop") for _ in chats]


def test_the_reply_cache_keys_on_the_generator_its_settings_and_the_prompt_version(tmp_path):
    chats = [[{"role": "user", "content": "Which?"}], [{"role": "user", "content": "Which?"}]]
    gen = Scripted()
    replies, asked = cached_complete(gen, chats, tmp_path, "v1")
    assert asked == 1 and len(gen.asked) == 1 and replies == [Reply("A", "stop")] * 2  # once
    again = Scripted("B")
    assert cached_complete(again, chats, tmp_path, "v1") == ([Reply("A", "stop")] * 2, 0)
    assert cached_complete(Scripted("B"), chats, tmp_path, "v2")[0][0].text == "B"
    other = Scripted("B")
    other.identity = "another model"
    assert cached_complete(other, chats, tmp_path, "v1")[1] == 1
    longer = Scripted("B")
    longer.settings = {"max_tokens": 8}
    assert cached_complete(longer, chats, tmp_path, "v1")[1] == 1
    assert cached_complete(Scripted("B"), chats, tmp_path, "v1", extra="examples 2")[1] == 1
    assert not list(tmp_path.glob(".*"))  # every entry written whole


# ------------------------------------------------------------------------------ inputs, switch
def write_eval(folder, answers: dict, questions=QUESTIONS):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("base", "lora"):
        (folder / f"{name}.jsonl").write_text(dumps_jsonl(
            {"question": q, "reference": ANSWERS[judge.AUTHOR][i], "prediction": answers[name][i]}
            for i, q in enumerate(questions)))
    return folder


def test_answers_are_read_for_the_models_evaluated_and_must_be_of_the_same_questions(tmp_path):
    questions, answers = judge.read_answers(write_eval(tmp_path / "eval", ANSWERS), limit=2)
    assert questions == QUESTIONS[:2] and set(answers) == {"base", "lora", judge.AUTHOR}
    assert answers[judge.AUTHOR] == ANSWERS[judge.AUTHOR][:2]
    rows = [json.loads(line) for line in (tmp_path / "eval/lora.jsonl").read_text().splitlines()]
    rows[1]["question"] = "Coffee?"
    (tmp_path / "eval/lora.jsonl").write_text(dumps_jsonl(rows))
    with pytest.raises(judge.JudgeError, match=r"lora.jsonl: question 2 \(of 3\) is not base.jsonl's"):
        judge.read_answers(tmp_path / "eval")


def test_examples_are_a_seeded_choice_of_train_answers():
    rows = [{"messages": [{"role": "system", "content": "persona"}, {"role": "user", "content": f"Q{i}?"},
                          {"role": "assistant", "content": f"Aye {i}."}]} for i in range(20)]
    picked = judge.example_answers(rows, 3, seed=0)
    assert picked == judge.example_answers(rows, 3, seed=0) != judge.example_answers(rows, 3, seed=1)
    assert len(set(picked)) == 3 and all(a.startswith("Aye") for a in picked)


@pytest.mark.parametrize("run, endpoint_url, source, off", [
    ("auto", None, "embedded:smollm2-135m-instruct", True),
    ("auto", "http://127.0.0.1:8080/v1", "embedded:smollm2-135m-instruct", False),
    ("auto", None, "microsoft/Phi-3-mini-4k-instruct", False),
    ("on", None, "embedded:smollm2-135m-instruct", False),
    ("off", "http://127.0.0.1:8080/v1", "microsoft/Phi-3-mini-4k-instruct", True),
])
def test_auto_is_off_only_for_the_embedded_135m_judge(run, endpoint_url, source, off):
    reason = judge.why_off({"run": run, "endpoint": endpoint_url}, source)
    assert (reason is not None) == off
    if run == "auto" and off:
        assert "answers by position" in reason


# ------------------------------------------------------------------------------ the stage
def stage_project(tmp_path, **judge_params):
    write_eval(tmp_path / "data/eval", ANSWERS)
    (tmp_path / "data/processed").mkdir(parents=True)
    (tmp_path / "data/processed/train.jsonl").write_text(dumps_jsonl(
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": e}]}
        for e in EXAMPLES))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"]["judge"].update(judge_params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def run_judge(project, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "stages/judge.py")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_stage_is_off_by_default_with_the_embedded_model_and_says_why(tmp_path):
    project = stage_project(tmp_path)
    result = run_judge(project)
    assert result.returncode == 0, result.stderr
    assert "judge: off: eval.judge.run is auto and the judge would be the embedded 135M" in result.stdout
    metrics = json.loads((project / "metrics/judge.json").read_text())
    assert metrics["run"] == "off" and "answers by position" in metrics["reason"]
    assert (project / "data/judge/verdicts.jsonl").read_text() == ""


def test_the_stage_through_an_endpoint_writes_verdicts_and_metrics(tmp_path, judge_server, monkeypatch):
    choose(monkeypatch, lambda first, second: "A" if first.startswith("Aye") else "B")
    project = stage_project(tmp_path, endpoint=judge_server)
    result = run_judge(project)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((project / "metrics/judge.json").read_text())
    assert metrics["run"] == "on" and metrics["generator"] == f"endpoint {judge_server} model default_model"
    assert metrics["contests"]["base_vs_author"]["losses"] == 3
    fitted = metrics["length_controlled"]
    assert fitted["anchor"] == "base" and set(fitted["models"]) == {"base", "lora", judge.AUTHOR}
    assert fitted["models"]["lora"]["controlled_win_prob"] is not None
    records = [json.loads(line) for line in (project / "data/judge/verdicts.jsonl").read_text().splitlines()]
    assert len(records) == 9 and all(set(r) >= {"replies", "letters", "verdict"} for r in records)
    assert list((project / "cache/judge").glob("*.json"))
    # a failed run (the examples gone) keeps the last good outputs
    before = (project / "metrics/judge.json").read_bytes()
    (project / "data/processed/train.jsonl").unlink()
    failed = run_judge(project)
    assert failed.returncode == 1 and "run `dvc repro prepare` first" in failed.stderr
    assert (project / "metrics/judge.json").read_bytes() == before


# ------------------------------------------------------------------------------ a real server
@pytest.mark.slow
def test_one_question_through_mlx_lm_server(tmp_path, mlx_server):
    """The judge asks mlx_lm.server over HTTP. Whatever the 135M model answers, every reply is
    recorded, parsed or counted as unparseable, and the second run asks nothing."""
    answers = {name: texts[:1] for name, texts in ANSWERS.items()}
    gen = generators.Endpoint(mlx_server, "default_model", None, timeout=900.0, max_tokens=4,
                              temperature=0.0, seed=0, section="eval.judge")
    records, metrics = judge.judge(QUESTIONS[:1], answers, EXAMPLES, gen, tmp_path)
    assert metrics["calls"] == metrics["asked"] == 6 and metrics["replies"] == 6
    assert all(len(r["replies"]) == 2 for r in records)
    parsed = [x for r in records for x in r["letters"] if x]
    assert metrics["unparseable"] == 6 - len(parsed)
    again = judge.judge(QUESTIONS[:1], answers, EXAMPLES, gen, tmp_path)
    assert again[1]["asked"] == 0 and again[0] == records
    print(json.dumps({"records": records, "position_bias": metrics["position_bias"]}, indent=1))
