"""`dvc repro` on the real dvc.yaml in a scratch copy of the project: runs, caches, reruns
only what a param change touches. The embedded model runs base_model and prepare; every stage
runs on a 2-layer random model (training the embedded one takes half an hour on 2 cores)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.dvc_graph import assert_reads_covered, read_audit_env
from tests.harness.fakes import FakeRewriter, serving
from tests.harness.project import (copy_project, differing, dvc, dvc_env, make_tiny_project, outputs,
                                   ran, set_param)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("project") / "repo"
    return copy_project(dest)


def test_repro_then_up_to_date_then_only_prepare_reruns(project):
    first = dvc(project, "repro", "prepare")
    assert "Running stage 'base_model'" in first.stdout and "Running stage 'prepare'" in first.stdout
    for name in ("train", "valid", "test"):
        assert (project / "data/processed" / f"{name}.jsonl").stat().st_size > 0
    assert (project / "models/base/model.safetensors").exists()
    assert (project / "dvc.lock").exists()

    again = dvc(project, "repro", "prepare")
    assert not ran(again.stdout) and "didn't change" in again.stdout

    set_param(project, "data", "seed", 1234)
    changed = dvc(project, "repro", "prepare")
    assert "Running stage 'prepare'" in changed.stdout
    assert "Running stage 'base_model'" not in changed.stdout
    assert "prepare" not in dvc(project, "status", "prepare").stdout


@pytest.fixture(scope="module")
def rewriter() -> Iterator[str]:
    """The rewrite stage's generator for the whole module: a stand-in OpenAI-compatible endpoint
    on 127.0.0.1 (tests/harness/fakes.py's FakeRewriter), whose paraphrases pass the checks."""
    with serving(FakeRewriter) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, tiny_model_dir, rewriter) -> Path:
    """The project configured to run every stage in about a minute: a 2-layer random Llama
    (as a local model folder), 60 exchanges and the sample posts' rewrite pairs (task both), a
    few iterations, short answers."""
    return make_tiny_project(tmp_path_factory.mktemp("tiny_project") / "repo", tiny_model_dir, rewriter)


def test_full_pipeline_on_a_tiny_model(tiny_project, tmp_path):
    # every Python process logs the project files it reads: each stage read only its deps
    dvc(tiny_project, "repro", env=read_audit_env(tiny_project, tmp_path / "reads"))
    assert_reads_covered(tiny_project, tmp_path / "reads")
    report = (tiny_project / "metrics/report.md").read_text()
    assert all(f"| {name} |" in report for name in ("base", "lora", "fused", "dpo"))
    for name in ("loss", "overlap", "lengths", "voice"):
        assert (tiny_project / f"metrics/plots/{name}.png").stat().st_size > 1000
    # the voice score: every model scored, fit on base answers to training questions
    voice = json.loads((tiny_project / "metrics/voice.json").read_text())
    assert set(voice["models"]) == {"base", "lora", "fused", "dpo"} and voice["questions"] == 4
    negatives = (tiny_project / "data/voice/negatives.jsonl").read_text().splitlines()
    assert voice["fit"]["other_texts"] == len(negatives) > 0
    assert "## Does it sound like the author?" in report
    # the judge: a local model folder is no 135M embedded model, so auto runs it
    judge = json.loads((tiny_project / "metrics/judge.json").read_text())
    # (the 4 questions and the 4 rewrites: "which did the author write?" asks of both)
    assert judge["run"] == "on" and judge["contests"]["lora_vs_base"]["pairs"] == 8
    assert "## The judge" in report
    compare = json.loads((tiny_project / "metrics/compare.json").read_text())
    assert set(compare) == {"lora_vs_base", "fused_vs_base", "fused_vs_lora", "dpo_vs_base", "dpo_vs_lora"}
    pairs = json.loads((tiny_project / "metrics/pairs.json").read_text())
    assert pairs["train_pairs"] + pairs["valid_pairs"] == pairs["self_pairs"] + pairs["arena_pairs"] >= 2
    fused = json.loads((tiny_project / "metrics/fuse.json").read_text())
    assert fused["ok"] and fused["greedy_answers_identical"] == 2
    lora = json.loads((tiny_project / "metrics/eval_lora.json").read_text())
    assert lora["n"] == 4 and lora["temperature"] == 0.0 and lora["hit_token_limit"] <= 4
    ingested = json.loads((tiny_project / "metrics/ingest.json").read_text())
    assert ingested["passages"] == 8 and (tiny_project / "data/ingested/pairs.jsonl").exists()
    # the rewrite task, end to end: pairs from the sample posts, split by post, evaluated
    made = json.loads((tiny_project / "metrics/rewrite.json").read_text())
    data = json.loads((tiny_project / "metrics/data.json").read_text())
    assert made["pairs"] == data["source"]["rewrite"]["pairs"] > 20
    assert all(data["tasks"][name]["rewrite"] >= 1 for name in ("train", "valid", "test"))
    for name in ("base", "lora", "fused", "dpo"):
        rw = json.loads((tiny_project / f"metrics/eval_{name}.json").read_text())["rewrite"]
        assert rw["n"] == min(4, data["tasks"]["test"]["rewrite"]) and rw["max_tokens"] == 10
        assert json.loads((tiny_project / f"metrics/eval_{name}.json").read_text())["n"] == 4
    assert set(compare["lora_vs_base"]["rewrite"]) >= {"chrf", "rouge_l", "content_kept", "length_off"}
    assert voice["rewrite"]["questions"] == rw["n"]
    assert "## Rewrites: a plain draft in the author's voice" in report
    shown = json.loads(dvc(tiny_project, "metrics", "show", "--json").stdout)
    assert "metrics/eval_fused.json" in json.dumps(shown)

    # changing only eval.* reruns evaluate and report, not train or fuse
    set_param(tiny_project, "eval", "max_tokens", 6)
    rerun = dvc(tiny_project, "repro").stdout
    assert all(f"Running stage 'evaluate@{m}'" in rerun for m in ("base", "lora", "fused", "dpo"))
    assert "Running stage 'pairs'" not in rerun and "Running stage 'preference'" not in rerun
    assert "Running stage 'report'" in rerun
    assert "Running stage 'train'" not in rerun and "Running stage 'fuse'" not in rerun

    # the evaluation is deterministic: forced reruns give identical predictions and metrics
    set_param(tiny_project, "eval", "max_tokens", 8)
    dvc(tiny_project, "repro")
    before = {p: (tiny_project / p).read_bytes() for p in ("data/eval/lora.jsonl", "metrics/eval_lora.json")}
    dvc(tiny_project, "repro", "-f", "-s", "evaluate@lora")
    after = {p: (tiny_project / p).read_bytes() for p in before}
    assert after == before

    # changing lora.rank retrains and re-evaluates, but does not re-prepare the data
    set_param(tiny_project, "lora", "rank", 2)
    retrained = dvc(tiny_project, "repro").stdout
    assert "Running stage 'train'" in retrained and "Running stage 'fuse'" in retrained
    assert "Running stage 'prepare'" not in retrained and "Running stage 'base_model'" not in retrained

    # changing only data.task: the rewrite pairs are remade (none for qa), the data prepared and
    # everything downstream of it rerun; ingest and the base model are not touched
    both = {p: (tiny_project / p).read_bytes() for p in ("data/rewrite/pairs.jsonl", "data/processed/test.jsonl")}
    set_param(tiny_project, "data", "task", "qa")
    task_qa = dvc(tiny_project, "repro").stdout
    assert {"rewrite", "prepare", "train", "evaluate@base", "voice", "report"} <= ran(task_qa)
    assert not {"ingest", "base_model"} & ran(task_qa)
    assert "rewrite" not in json.loads((tiny_project / "metrics/eval_base.json").read_text())
    assert (tiny_project / "data/rewrite/pairs.jsonl").read_text() == ""
    # and back: the same pairs, every reply from the cache, the same samples
    set_param(tiny_project, "data", "task", "both")
    dvc(tiny_project, "repro")
    assert {p: (tiny_project / p).read_bytes() for p in both} == both
    again = json.loads((tiny_project / "metrics/rewrite.json").read_text())
    assert again["cache_hits"] == made["passages"] and again["passages_generated"] == 0
    assert "rewrite" in json.loads((tiny_project / "metrics/eval_base.json").read_text())
    predictions = (tiny_project / "data/eval/lora.jsonl").read_bytes()
    dvc(tiny_project, "repro", "-f", "-s", "evaluate@lora")
    assert (tiny_project / "data/eval/lora.jsonl").read_bytes() == predictions


def test_a_vote_reruns_only_arena_pairs_and_report(tiny_project):
    """votes.jsonl is a dep of the arena and pairs_votes stages: a new vote reruns the ratings,
    the pairs (arena is among preference.sources) and the report, nothing upstream; votes that
    add no pair (these do not say they were on a training question) leave data/pairs as it
    was, so preference tuning does not rerun. With no votes the ratings and the report say so."""
    from voicetune.data.votes import append_vote, weights_identity

    dvc(tiny_project, "repro")  # a no-op after test_full_pipeline_on_a_tiny_model
    assert json.loads((tiny_project / "metrics/arena.json").read_text())["votes"] == 0
    assert "No arena votes yet" in (tiny_project / "metrics/report.md").read_text()
    adapter = weights_identity(tiny_project)["adapters"]
    assert adapter and adapter.endswith(".dir")
    for choice in ("A", "A", "B", "tie", "both_bad"):
        append_vote(tiny_project / "data/arena/votes.jsonl",
                    {"schema": 1, "question": "Reef early?", "model_a": "lora", "model_b": "base",
                     "answer_a": "Aye.", "answer_b": "No.", "vote": choice, "adapter": adapter})
    assert ran(dvc(tiny_project, "repro").stdout) == {"arena", "pairs_votes", "pairs", "report"}
    assert json.loads((tiny_project / "metrics/pairs.json").read_text())["arena_test_excluded"] == 3
    arena = json.loads((tiny_project / "metrics/arena.json").read_text())
    assert (arena["used"], arena["both_bad"], arena["models"]["lora"]["wins"]) == (5, 1, 2)
    report = (tiny_project / "metrics/report.md").read_text()
    assert "| lora |" in report and "![arena ratings](plots/arena.png)" in report
    assert (tiny_project / "metrics/plots/loss.png").exists()  # beside arena.png, both kept
    assert not ran(dvc(tiny_project, "repro").stdout)


def test_editing_a_local_model_folder_reruns_base_model(tmp_path, tiny_model_dir):
    """model.source is a string: the model_source stage turns a local folder's content into a
    dep of base_model, and leaves it up to date while the bytes stay the same."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    project = make_tiny_project(tmp_path / "repo", model)
    assert ran(dvc(project, "repro", "base_model").stdout) == {"base_model"}

    os.utime(model / "config.json")  # a new mtime, the same bytes
    noop = dvc(project, "repro", "base_model").stdout
    assert "Running stage 'model_source'" in noop and not ran(noop)

    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "top_k": 7}))
    assert ran(dvc(project, "repro", "base_model").stdout) == {"base_model"}
    assert json.loads((project / "models/base/generation_config.json").read_text())["top_k"] == 7
    assert not ran(dvc(project, "repro", "base_model").stdout)


def test_the_source_fingerprint_covers_every_file_base_model_copies(tmp_path, tiny_model_dir):
    from voicetune.models.base_model import materialize
    from voicetune.models.source import fingerprint

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / ".hidden").write_text("not copied")
    (model / "extra.txt").write_text("copied")
    (tmp_path / "out").mkdir()
    materialize(str(model), None, tmp_path / "out")
    copied = {f.name for f in (tmp_path / "out").iterdir() if (model / f.name).is_file()}
    assert "extra.txt" in copied and copied == set(fingerprint(str(model), None, {})["files"])


def test_a_bad_data_row_keeps_the_last_good_outputs(tiny_project):
    dvc(tiny_project, "repro")  # a no-op after test_full_pipeline_on_a_tiny_model
    before = outputs(tiny_project)
    source = tiny_project / "data/sample/small.jsonl"
    good = source.read_text()
    source.write_text(good + '{"conversation": [{"role": "user"}]}\n')
    try:
        failed = dvc(tiny_project, "repro", ok=False)
        assert failed.returncode != 0 and "prepare: " in failed.stderr, failed.stderr
        assert differing(outputs(tiny_project), before) == []  # data/processed, metrics/data.json, downstream
    finally:
        source.write_text(good)
    assert not ran(dvc(tiny_project, "repro").stdout)

    # persisted outputs are still cached: dvc checkout restores them
    shutil.rmtree(tiny_project / "data/processed")
    shutil.rmtree(tiny_project / "models/adapters")
    dvc(tiny_project, "checkout")
    assert differing(outputs(tiny_project), before) == []


def train_process(dvc_process):
    import psutil

    # The Python process itself, not the shell DVC may run it under: /bin/sh (dash) does not
    # exec a `-c` command, so killing the shell would leave training running as an orphan.
    for child in dvc_process.children(recursive=True):
        try:
            if "stages/train.py" in child.cmdline()[1:2]:
                return child
        except psutil.Error:  # gone, or a zombie, between listing and asking
            continue
    return None


def test_a_killed_training_run_keeps_the_last_good_outputs_then_resumes(tiny_project):
    import psutil

    dvc(tiny_project, "repro")
    # prepare reads train.iters too (for its epochs figure): it reruns, and may change
    before = outputs(tiny_project, skip=("prepare",))
    set_param(tiny_project, "train", "iters", 200)  # long enough to be killed mid-run
    checkpoint = tiny_project / "models/.train-checkpoint/state.safetensors"
    checkpoint.unlink(missing_ok=True)
    run = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=tiny_project,
                           env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        train = None
        while run.poll() is None and time.monotonic() < deadline:
            train = train or train_process(psutil.Process(run.pid))
            if train is not None and checkpoint.exists():  # a checkpoint is written: kill -9
                train.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert train is not None and run.returncode != 0, output
    assert "Running stage 'train'" in output
    # models/adapters, metrics/train.json, dvclive/train, and everything downstream
    assert differing(outputs(tiny_project, skip=("prepare",)), before) == []

    resumed = dvc(tiny_project, "repro").stdout
    assert "Running stage 'train'" in resumed and "Running stage 'report'" in resumed
    assert json.loads((tiny_project / "metrics/train.json").read_text())["resumed_from"]


def test_the_my_blog_recipe_goes_from_a_folder_of_posts_to_data_split_by_post(tmp_path, tiny_model_dir):
    """`make recipe R=my-blog`, posts in posts/, `dvc repro`: ingest feeds prepare, and every
    post's pairs land in one split. The generator is a stand-in OpenAI-compatible server on
    127.0.0.1 (tests/data/test_ingest.py's, with grounded first-person answers): the tiny random
    model writes no parseable question."""
    from tests.harness.fakes import FakeOpenAI
    from http.server import ThreadingHTTPServer
    import threading

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        project = make_tiny_project(tmp_path / "repo", tiny_model_dir)
        shutil.copytree(project / "data/sample/posts", project / "posts")
        recipe = subprocess.run([sys.executable, "-m", "voicetune.tools.recipe", "recipes/my-blog.yaml"],
                                cwd=project, capture_output=True, text=True, env=dvc_env())
        assert recipe.returncode == 0, recipe.stderr
        set_param(project, "ingest", "endpoint", f"http://127.0.0.1:{server.server_address[1]}/v1")
        set_param(project, "ingest", "questions", 2)
        out = dvc(project, "repro", "prepare").stdout
        assert "Running stage 'ingest'" in out and "Running stage 'prepare'" in out
    finally:
        server.shutdown()
    ingested = [json.loads(line) for line in (project / "data/ingested/pairs.jsonl").read_text().splitlines()]
    post_of = {row["conversation"][0]["content"]: row["post_id"] for row in ingested}
    metrics = json.loads((project / "metrics/ingest.json").read_text())
    assert metrics["posts"] == 8 and metrics["pairs"] == len(ingested) > 20
    posts_in = {}
    for name in ("train", "valid", "test"):
        rows = [json.loads(line) for line in (project / f"data/processed/{name}.jsonl").read_text().splitlines()]
        questions = [m["content"] for row in rows for m in row["messages"] if m["role"] == "user"]
        assert questions
        posts_in[name] = {post_of[q] for q in questions}
    assert sum(len(s) for s in posts_in.values()) == len(set().union(*posts_in.values())) == 8
