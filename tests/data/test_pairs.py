"""The pairs stage (voicetune/data/pairs.py, stages/pairs.py): the author's answer against the
LoRA's own greedy answer, train split only; arena votes for the current adapter, test and
held-out questions left out; alike pairs dropped and counted; byte-identical reruns; too few
pairs refused with a message and no output. On a 2-layer random Llama with adapters."""
import json
import shutil
import subprocess

import pytest
import yaml

from voicetune.core import kernels
from voicetune.models.fusion import load_float32
from voicetune.models.generation import generate_batched, prompt_tokens
from voicetune.data.pairs import (PairsError, arena_pairs, build, drop_alike, heldout, read_exchanges,
                             sample, similarity, split)

from tests.conftest import PERSONA, ROOT, run_stage, write_jsonl
from tests.harness.models import write_adapters

ADAPTER = "c89e633d788bf424b1c6eda3e1739be4.dir"
P_PREF = yaml.safe_load((ROOT / "params.yaml").read_text())["preference"]
MAX_TOKENS, BATCH, PENALTY = 8, 4, 1.2
LONG = ("Reef early, reef often: by the time you wonder whether it is time to reef, it is past "
        "time. Take the first reef in harbour if the forecast says twenty knots, and shake it out "
        "later if you must. Nobody ever drowned from being under-canvassed on a summer afternoon.")


def self_pair(chosen: str, rejected: str, prompt: str = "Reef?") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": PERSONA,
            "source": "self", "question_index": 0}


def vote(question: str = "Do you like knots?", choice: str = "A", adapter: str = ADAPTER,
         from_test: bool | None = False, a: str = "Aye, every one.", b: str = "No.") -> dict:
    record = {"schema": 1, "battle_id": "x", "question": question, "model_a": "lora",
              "model_b": "base", "answer_a": a, "answer_b": b, "vote": choice, "system": PERSONA,
              "adapter": adapter}
    if from_test is not None:
        record["from_test"] = from_test
    return record


# ------------------------------------------------------------------ the parts, no model
def test_identical_and_nearly_identical_pairs_are_dropped_and_counted():
    near = LONG.replace("twenty", "twenty-five")  # one small edit in a 280-character answer
    assert similarity(LONG, near) > 0.95  # autojunk off: a near-copy reads as one
    pairs = [self_pair(LONG, LONG), self_pair(LONG, "  " + LONG + "\n"), self_pair(LONG, near),
             self_pair(LONG, "I would not know, I am a language model."), self_pair("Aye.", "Nay.")]
    kept, counts = drop_alike(pairs, max_similarity=0.9)
    assert counts == {"dropped_identical": 2, "dropped_similar": 1}
    assert kept == pairs[3:]
    # the threshold is inclusive; 1.0 drops only what is identical
    ratio = similarity("Aye.", "Nay.")
    assert drop_alike([self_pair("Aye.", "Nay.")], ratio)[1]["dropped_similar"] == 1
    assert drop_alike(pairs, 1.0)[1] == {"dropped_identical": 2, "dropped_similar": 0}


def test_the_sample_is_seeded_nested_and_in_file_order():
    assert sample(10, None, 0) == sample(10, 10, 0) == sample(10, 99, 0) == list(range(10))
    five = sample(100, 5, 0)
    assert five == sample(100, 5, 0) == sorted(five) and len(set(five)) == 5
    assert set(five) <= set(sample(100, 8, 0))  # more pairs keep the questions already drawn
    assert five != sample(100, 5, 1)


def test_the_validation_slice_is_seeded_and_never_empty():
    pairs = [self_pair(str(i), "x", f"Question {i}?") for i in range(10)]
    train, valid = split(pairs, 0.25, 0)
    assert (len(train), len(valid)) == (8, 2) and (train, valid) == split(pairs, 0.25, 0)
    assert sorted(train + valid, key=lambda p: int(p["chosen"])) == pairs
    assert [p for p in pairs if p in train] == train  # original order kept on both sides
    assert len({str(split(pairs, 0.25, seed)[1]) for seed in range(4)}) > 1
    assert [len(s) for s in split(pairs[:2], 0.0, 0)] == [1, 1]
    assert [len(s) for s in split(pairs[:3], 0.9, 0)] == [1, 2]


def test_every_pair_of_one_question_lies_on_one_side_of_the_split():
    """A self-play pair and arena pairs on the same question (however it is spelt) split apart
    would put a question trained on into validation: preference early stopping flattered."""
    questions = [f"Question {i}: which knot?" for i in range(8)]
    pairs = [{**self_pair("Aye.", "x", q), "q": i} for i, q in enumerate(questions)]
    pairs += [{**self_pair("Nay.", "y", q.upper().replace(":", "")), "source": "arena", "q": i}
              for i, q in enumerate(questions)]
    pairs.append({**self_pair("Both.", "z", questions[3] + "  "), "q": 3})  # a third on one
    for seed in range(6):
        train, valid = split(pairs, 0.25, seed)
        assert sorted(map(str, train + valid)) == sorted(map(str, pairs))
        assert not {p["q"] for p in train} & {p["q"] for p in valid}, seed
        assert len({p["q"] for p in valid}) == 2  # floor(0.25 * 8 questions)
        assert split(pairs, 0.25, seed) == (train, valid)  # seeded: the same slice again
    assert len({str(split(pairs, 0.25, seed)[1]) for seed in range(6)}) > 1
    # two pairs on one question cannot be split at all
    with pytest.raises(PairsError, match="2 preference pairs, all on one question after dropping"):
        build({**P_PREF, "sources": ["arena"]}, {}, [], set(),
              [vote(), vote(a="Aye, with both hands.")], {"adapters": ADAPTER}, load_model=None)


def test_arena_votes_only_for_this_adapter_and_questions_that_may_be_trained_on():
    held = {"why reef early"}
    votes = [vote(), vote(choice="B", question="Tea or coffee?"),
             vote(adapter="0ld.dir"), vote(from_test=True), vote(from_test=None),
             vote(question="  Why REEF early?!"), vote(choice="tie"), vote(choice="both_bad"),
             vote(a="Same.", b="Same.")]
    pairs, counts = arena_pairs(votes, {"adapters": ADAPTER}, held)
    assert counts == {"arena_other_weights": 1, "arena_test_excluded": 2,
                      "arena_heldout_question_excluded": 1}
    assert pairs == [
        {"prompt": "Do you like knots?", "chosen": "Aye, every one.", "rejected": "No.",
         "system": PERSONA, "source": "arena", "question_index": None},
        {"prompt": "Tea or coffee?", "chosen": "No.", "rejected": "Aye, every one.",
         "system": PERSONA, "source": "arena", "question_index": None}]
    # no adapter in dvc.lock: no vote can be for the current one
    assert arena_pairs(votes, {}, held)[1]["arena_other_weights"] == 6


def test_arena_votes_count_only_when_every_weight_behind_them_is_the_current_one():
    """A vote records the identity of every weight file behind its two answers: a battle
    with the fused or dpo model (weights this stage does not depend on) or on another base
    gives no pair, whatever its SFT adapter."""
    current = {"base": "b45e.dir", "adapters": ADAPTER}

    def battle(model_b: str, **weights) -> dict:
        made_of = {"base": "b45e.dir", "adapters": ADAPTER, **weights}
        return {**vote(), "schema": 2, "model_b": model_b, "weights": made_of}

    votes = [battle("base"), battle("base", base="0ther.dir"), battle("fused", fused="f.dir"),
             battle("dpo", fused="f.dir", preference_adapters="p.dir")]
    pairs, counts = arena_pairs(votes, current, set())
    assert len(pairs) == 1 and counts["arena_other_weights"] == 3


def test_every_bad_row_of_a_split_is_named_at_once(tmp_path):
    turn = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Aye."}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps({"messages": turn}), '{"messages": [', json.dumps({"text": "x"}),
                               json.dumps({"messages": [*turn, *turn]}), json.dumps({"messages": turn})]) + "\n")
    with pytest.raises(PairsError) as err:
        read_exchanges(path)
    assert [line.strip().split(": ", 1)[0] for line in str(err.value).splitlines()[1:]] == \
        [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert 'not a {"messages": [...]} row of the prepare stage' in str(err.value)


def test_a_row_with_earlier_turns_is_refused_with_its_line(tmp_path):
    turn = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Aye."}]
    write_jsonl(tmp_path / "valid.jsonl", [])
    path = write_jsonl(tmp_path / "train.jsonl",
                       [{"messages": [{"role": "system", "content": PERSONA}, *turn]},
                        {"messages": [{"role": "system", "content": PERSONA}, *turn, *turn]}])
    with pytest.raises(PairsError, match=r"train\.jsonl:2: roles .*one exchange per row"):
        read_exchanges(path)
    assert heldout([path.with_name("valid.jsonl")]) == set()  # an empty split: no question
    with pytest.raises(PairsError, match=r"test\.jsonl: not found; run the prepare stage"):
        heldout([tmp_path / "test.jsonl"])


# ------------------------------------------------------------------ the stage, end to end
@pytest.fixture(scope="module")
def project(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """A scratch project: the tiny splits, adapters that change the model's answers, a dvc.lock
    naming them, votes of every kind, and the LoRA's own answers to every training question.
    Two training answers are rewritten: one to the LoRA's answer, one to a near-copy of it."""
    root = tmp_path_factory.mktemp("pairs")
    adapters = write_adapters(tiny_model_dir, root / "adapters", scale_b=0.05)
    processed = root / "data/processed"
    shutil.copytree(tiny_data_dir, processed)
    rows = [json.loads(line) for line in (processed / "train.jsonl").open()]
    model, tokenizer, _ = load_float32(tiny_model_dir, adapters)
    # each answer on its own: what the LoRA says to that question, whatever the batch
    answers = [generate_batched(model, tokenizer, [prompt_tokens(tokenizer, r["messages"])], MAX_TOKENS,
                                repetition_penalty=PENALTY)[0] for r in rows]
    drawn = sample(len(rows), 12, 0)
    identical, similar = drawn[:2]
    rows[identical]["messages"][-1]["content"] = answers[identical]["prediction"]
    rows[similar]["messages"][-1]["content"] = answers[similar]["prediction"] + "!"
    write_jsonl(processed / "train.jsonl", rows)
    (root / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models/adapters", "md5": ADAPTER}]}}}))
    valid_question = json.loads((processed / "valid.jsonl").open().readline())["messages"][1]["content"]
    test_question = json.loads((processed / "test.jsonl").open().readline())["messages"][1]["content"]
    (root / "data/arena").mkdir(parents=True)
    write_jsonl(root / "data/arena/votes.jsonl", [
        vote(), vote(question="Tea or coffee?", choice="B"), vote(adapter="0ld.dir"),
        vote(question=test_question, from_test=True), vote(question=valid_question.upper()),
        vote(choice="tie"), '{"schema": 1, "vote": "A", "quest'])  # a torn last line
    return {"root": root, "base": tiny_model_dir, "adapters": adapters, "rows": rows,
            "answers": answers, "identical": identical, "similar": similar}


def run_pairs(project: dict, name: str, votes: str | None = None, model: str | None = None,
              **preference):
    """The stage in the scratch project with these preference params; its outputs in ``name``."""
    root = project["root"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["preference"].update({"sources": ["self", "arena"], "pairs": 12, "max_tokens": MAX_TOKENS,
                                 "max_similarity": 0.9, "valid_ratio": 0.25, "seed": 0,
                                 # the tiny random model's answers all run to MAX_TOKENS
                                 "drop_cut_answers": False, **preference})
    params["eval"].update({"batch_size": BATCH, "repetition_penalty": PENALTY})
    (root / f"{name}.yaml").write_text(yaml.safe_dump(params))
    # the pairs_votes stage first, as dvc repro runs it: the votes pairs reads
    passed = run_stage("pairs_votes.py", "--params", f"{name}.yaml", "--out", f"{name}-votes.json",
                       *(["--votes", votes] if votes else []), cwd=root)
    if passed.returncode:
        return passed
    result = run_stage("pairs.py", "--params", f"{name}.yaml", "--model", model or str(project["base"]),
                       "--adapters", str(project["adapters"]), "--out", f"{name}/pairs",
                       "--metrics", f"{name}/pairs.json", "--votes", f"{name}-votes.json", cwd=root)
    return subprocess.CompletedProcess(result.args, result.returncode, passed.stdout + result.stdout,
                                       passed.stderr + result.stderr)


def outputs(project: dict, name: str) -> dict:
    folder = project["root"] / name
    return {"train": [json.loads(line) for line in (folder / "pairs/train.jsonl").open()],
            "valid": [json.loads(line) for line in (folder / "pairs/valid.jsonl").open()],
            "metrics": json.loads((folder / "pairs.json").read_text()),
            "bytes": [(folder / f).read_bytes() for f in ("pairs/train.jsonl", "pairs/valid.jsonl", "pairs.json")]}


def questions(project: dict, split_name: str) -> set[str]:
    return {json.loads(line)["messages"][-2]["content"]
            for line in (project["root"] / f"data/processed/{split_name}.jsonl").open()}


def test_self_play_and_arena_pairs_end_to_end(project):
    result = run_pairs(project, "both")
    assert result.returncode == 0, result.stderr
    assert "not a whole vote" in result.stderr and "Traceback" not in result.stderr
    assert "pairs: 9 train + 3 valid pairs (10 self, 2 arena) from 14 candidates" in result.stdout
    out = outputs(project, "both")
    drawn = sample(len(project["rows"]), 12, 0)
    kept = [i for i in drawn if i not in (project["identical"], project["similar"])]
    assert out["metrics"] == {
        "candidates": 14, "generated": 12, "arena_candidates": 2, "dropped_cut": 0, "dropped_identical": 1,
        "dropped_similar": 1, "self_pairs": 10, "arena_pairs": 2, "arena_other_weights": 1,
        "arena_test_excluded": 1, "arena_heldout_question_excluded": 1, "train_pairs": 9, "valid_pairs": 3,
        "max_tokens": MAX_TOKENS,
        "hit_token_limit": sum(project["answers"][i]["finish_reason"] == "length" for i in drawn),
        # the mean lengths of what was kept, from the inputs: the author's answers and the LoRA's
        # own against them, and the two arena votes' answers (B won the second)
        "chosen_chars": round(sum(map(len, [project["rows"][i]["messages"][-1]["content"] for i in kept]
                                        + ["Aye, every one.", "No."])) / 12, 1),
        "rejected_chars": round(sum(map(len, [project["answers"][i]["prediction"] for i in kept]
                                          + ["No.", "Aye, every one."])) / 12, 1),
        "fast_cpu_kernels": kernels.resolve("auto")}  # kernels.fast_cpu: auto, as committed
    pairs = out["train"] + out["valid"]
    assert not {p["prompt"] for p in out["train"]} & {p["prompt"] for p in out["valid"]}
    assert all(list(p) == ["prompt", "chosen", "rejected", "system", "source", "question_index"]
               and p["system"] == PERSONA for p in pairs)
    mine = sorted((p for p in pairs if p["source"] == "self"), key=lambda p: p["question_index"])
    assert [p["question_index"] for p in mine] == kept
    for p in mine:  # the author's answer against the LoRA's own greedy prediction
        row = project["rows"][p["question_index"]]["messages"]
        assert (p["prompt"], p["chosen"]) == (row[-2]["content"], row[-1]["content"])
        assert p["rejected"] == project["answers"][p["question_index"]]["prediction"] != ""
    train_questions = questions(project, "train")
    assert {p["prompt"] for p in mine} <= train_questions
    assert not {p["prompt"] for p in pairs} & (questions(project, "valid") | questions(project, "test"))
    arena = [p for p in pairs if p["source"] == "arena"]
    assert sorted((p["prompt"], p["chosen"]) for p in arena) == [
        ("Do you like knots?", "Aye, every one."), ("Tea or coffee?", "No.")]
    assert all(p["question_index"] is None for p in arena)

    again = run_pairs(project, "again")  # greedy: the same bytes
    assert again.returncode == 0, again.stderr
    assert outputs(project, "again")["bytes"] == out["bytes"]


def test_self_play_only_uses_every_training_question_and_no_vote(project):
    result = run_pairs(project, "self", sources=["self"], pairs=None)
    assert result.returncode == 0, result.stderr
    assert "not a whole vote" not in result.stderr  # the votes are not even read
    metrics = outputs(project, "self")["metrics"]
    n = len(project["rows"])
    assert (metrics["generated"], metrics["self_pairs"], metrics["arena_pairs"]) == (n, n - 2, 0)
    assert metrics["arena_other_weights"] == metrics["arena_test_excluded"] == 0
    assert (metrics["train_pairs"], metrics["valid_pairs"]) == (n - 2 - (n - 2) // 4, (n - 2) // 4)


def test_arena_only_loads_no_model(project):
    result = run_pairs(project, "arena", sources=["arena"], model="no/such/model")
    assert result.returncode == 0, result.stderr
    out = outputs(project, "arena")
    assert (out["metrics"]["generated"], out["metrics"]["arena_pairs"]) == (0, 2)
    assert (len(out["train"]), len(out["valid"])) == (1, 1)
    assert out["metrics"]["hit_token_limit"] == 0


def test_answers_cut_at_max_tokens_are_dropped_and_counted(project):
    """Cut mid-sentence but closed by the end-of-turn token, such an answer would teach DPO an
    artifact (stopping early is bad): the default drops it. The tiny model never stops."""
    result = run_pairs(project, "cut", drop_cut_answers=True)
    assert result.returncode == 0, result.stderr
    metrics = outputs(project, "cut")["metrics"]
    assert metrics["hit_token_limit"] == metrics["dropped_cut"] == metrics["generated"] == 12
    assert (metrics["self_pairs"], metrics["arena_pairs"]) == (0, 2)
    assert "12 rejected answers cut at 8 tokens" in result.stdout


def test_too_few_pairs_is_a_message_and_keeps_the_last_good_outputs(project):
    root = project["root"]
    write_jsonl(root / "one_vote.jsonl", [vote(), vote(adapter="0ld.dir")])
    (root / "few/pairs").mkdir(parents=True)
    (root / "few/pairs/train.jsonl").write_text("last good\n")
    (root / "few/pairs.json").write_text("{}\n")
    result = run_pairs(project, "few", votes="one_vote.jsonl", sources=["arena"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("pairs: 1 preference pair after dropping 0 cut at "
                                    "preference.max_tokens and 0 whose answers are alike")
    assert "at least 2 questions are needed" in result.stderr and "preference.sources" in result.stderr
    assert sorted(p.relative_to(root / "few").as_posix() for p in (root / "few").rglob("*")) == [
        "pairs", "pairs.json", "pairs/train.jsonl"]  # nothing half-written beside them
    assert (root / "few/pairs/train.jsonl").read_text() == "last good\n"
    assert (root / "few/pairs.json").read_text() == "{}\n"


# ------------------------------------------------------------------ the votes pairs reads
def test_the_votes_reach_pairs_only_when_arena_is_a_source(tmp_path):
    """pairs_votes is the condition DVC cannot write: with arena among preference.sources its
    output (the pairs stage's dependency) changes with every vote; without, it stays the same
    bytes and no vote is read, so dvc repro leaves the pairs stage's generation alone."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    votes = write_jsonl(tmp_path / "votes.jsonl", [vote()])

    def passed(sources: list[str]) -> tuple[bytes, subprocess.CompletedProcess]:
        params["preference"]["sources"] = sources
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        result = run_stage("pairs_votes.py", "--votes", str(votes), "--out", "used.json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "used.json").read_bytes(), result

    alone, result = passed(["self"])
    assert json.loads(alone) == {"votes_file": None, "votes": []}
    assert "none; preference.sources is [self], without arena" in result.stdout
    with open(votes, "a") as f:
        f.write(json.dumps(vote(choice="B")) + "\n" + '{"schema": 1, "vote": "A", "quest')  # torn
    again, result = passed(["self"])
    assert again == alone and "not a whole vote" not in result.stderr  # not even read
    both, result = passed(["self", "arena"])
    assert json.loads(both) == {"votes_file": str(votes), "votes": [vote(), vote(choice="B")]}
    assert "WARNING: " in result.stderr and "votes.jsonl:3: not a whole vote" in result.stderr
    from voicetune.data.pairs import read_votes_used

    assert read_votes_used(tmp_path / "used.json") == [vote(), vote(choice="B")]
    (tmp_path / "used.json").write_bytes(alone)  # stale: written for sources [self]
    with pytest.raises(PairsError, match=r"used\.json was written without arena among "
                                         r"preference\.sources.*dvc repro pairs_votes"):
        read_votes_used(tmp_path / "used.json")
    (tmp_path / "used.json").write_text("[]\n")
    with pytest.raises(PairsError, match=r"used\.json: not the pairs_votes stage's output"):
        read_votes_used(tmp_path / "used.json")


def test_pairs_depends_on_the_votes_it_reads_not_on_the_votes_file():
    """As DVC resolves dvc.yaml: the votes file is a dependency of pairs_votes, which writes
    what pairs reads; the pairs stage itself does not rerun on a vote it does not use."""
    from tests.harness.dvc_graph import stages

    graph = stages()
    votes, used = ROOT / "data/arena/votes.jsonl", ROOT / "data/pairs_votes.json"
    assert votes not in graph["pairs"]["deps"] and used in graph["pairs"]["deps"]
    assert votes in graph["pairs_votes"]["deps"] and graph["pairs_votes"]["outs"] == [used]


def test_the_committed_votes_file_holds_no_vote_and_is_not_empty(tmp_path):
    """DVC warns "'data/arena/votes.jsonl' is empty." whenever a stage that depends on an empty
    file runs; one empty line reads as no vote, and a vote appended to it as the first."""
    from voicetune.data.votes import append_vote, read_votes

    committed = (ROOT / "data/arena/votes.jsonl").read_bytes()
    assert committed.strip() == b"" and committed != b""
    assert read_votes(ROOT / "data/arena/votes.jsonl") == ([], [])
    (tmp_path / "votes.jsonl").write_bytes(committed)
    append_vote(tmp_path / "votes.jsonl", vote())
    assert read_votes(tmp_path / "votes.jsonl") == ([vote()], [])
