"""Stage prepare end to end: outputs, determinism, nothing written on failure."""
import hashlib
import json
import re
import shutil

import yaml

from voicetune.models.base_model import override_chat_template

from tests.conftest import ROOT, qa, run_stage, write_jsonl
from tests.harness.models import DROPS_SYSTEM

PERSONA = "You are Captain Tilly Brask."


def params_file(tmp_path, source, batch_size=2, max_seq_length=43, **data):
    """The project's params.yaml (every section is required) with these data/train values."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"source": str(source), "system_prompt": PERSONA, "seed": 7,
                           "valid_ratio": 0.1, "test_ratio": 0.1, "split_by": "exchange", "task": "qa", **data})
    params["train"].update({"batch_size": batch_size, "iters": 100, "max_seq_length": max_seq_length})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def prepare(tmp_path, model_dir, params, out="processed"):
    return run_stage("prepare.py", "--params", str(params), "--model", str(model_dir),
                     "--out", str(tmp_path / out), "--metrics", str(tmp_path / out / "../data.json"))


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prepare_writes_chat_splits_and_summary(tmp_path, base_model_dir):
    near_duplicate = {"question": "  question NUMBER 5 what about knots", "answer": qa(5)["conversation"][1]["content"]}
    conflict = qa(99, "Question number 3: what about knots?")  # qa(3)'s question, another answer
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(40)] + [near_duplicate, conflict])
    result = prepare(tmp_path, base_model_dir, params_file(tmp_path, source, batch_size=3))
    assert result.returncode == 0, result.stderr
    assert "train 32 / valid 4 / test 4" in result.stdout
    # warnings go to stderr, each naming both rows; the summary on stdout stays clean
    assert "warning" not in result.stdout and "duplicate" not in result.stdout
    assert "qa.jsonl:41: duplicate question (first at " in result.stderr and "qa.jsonl:6)" in result.stderr
    assert "qa.jsonl:42: same question as " in result.stderr and "qa.jsonl:4 with a different answer" in result.stderr
    assert "will be truncated" in result.stderr and "warning: 40 samples" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "processed/train.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    assert all(r["messages"][0]["content"] == PERSONA for r in rows)
    summary = json.loads((tmp_path / "data.json").read_text())
    assert summary["source"] == {"path": str(source), "files": [str(source)]}
    assert summary["samples"] == {"train": 32, "valid": 4, "test": 4}
    assert summary["duplicates_dropped"] == 2 and summary["conflicting_answers"] == 1
    # every sample is trained each epoch, the last batch partial: ceil(32 / 3) steps
    assert summary["steps_per_epoch"] == 11 and summary["epochs"] == 9.09
    # ChatML overhead + persona + question + answer: 44 to 46 tokens each, over max_seq_length 43
    assert 40 < summary["tokens"]["p50"] <= summary["tokens"]["max"] < 60
    assert summary["tokens"]["over_max_seq_length"] == 40 and summary["train_over_max_seq_length"] == 32

    first = digest(tmp_path / "processed")
    assert prepare(tmp_path, base_model_dir, params_file(tmp_path, source, batch_size=3)).returncode == 0
    assert digest(tmp_path / "processed") == first


LONG = "what about knots, and also about the long splice, the short splice and the eye splice when the rope is wet?"


def test_prompts_that_fill_max_seq_length_stop_the_stage(tmp_path, base_model_dir):
    """Samples whose persona + question alone reach max_seq_length keep no answer token: before,
    prepare said "will be truncated" and training died later with a nan validation loss."""
    rows = [qa(i, f"Question number {i}: {LONG}" if i % 5 == 0 else None) for i in range(40)]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    result = prepare(tmp_path, base_model_dir, params_file(tmp_path, source, max_seq_length=50))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr
    assert message.startswith("prepare: ") and "8 samples would keep no answer token" in message
    counts = re.search(r"\(train (\d+), valid (\d+), test (\d+)\)", message)
    assert counts and sum(map(int, counts.groups())) == 8
    assert re.search(r"qa\.jsonl:(1|6|11|16|21|26|31|36)\b", message)
    # prompts of these long questions are 54-55 tokens: one answer token needs one more
    needed = int(re.search(r"Raise train\.max_seq_length to at least (\d+)", message).group(1))
    assert 54 < needed < 60 and "shorten data.system_prompt" in message
    assert not (tmp_path / "processed").exists() and not (tmp_path / "data.json").exists()

    result = prepare(tmp_path, base_model_dir, params_file(tmp_path, source, max_seq_length=needed))
    assert result.returncode == 0, result.stderr
    assert "will be truncated" in result.stderr  # some answer tokens kept: a warning only


def test_hub_dataset_is_recorded_at_its_commit_sha(tmp_path, base_model_dir, monkeypatch, capsys):
    """The stage run in-process with a recording stand-in for the hub client (RecordingHub):
    offline, `hub_revision: main` is resolved to a full sha, downloaded at it and recorded."""
    import importlib.util
    import sys

    from tests.harness.fakes import SHA, RecordingHub

    RecordingHub(monkeypatch)
    spec = importlib.util.spec_from_file_location("prepare_stage", ROOT / "stages/prepare.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    params = params_file(tmp_path, tmp_path / "absent.jsonl", hub_dataset="someone/qa",
                         hub_revision="main", valid_ratio=0.0, test_ratio=0.0)
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--params", str(params), "--model", str(base_model_dir),
                                      "--out", str(tmp_path / "processed"), "--metrics", str(tmp_path / "data.json")])
    monkeypatch.setattr(stage.qa, "check_split_sizes", lambda splits, batch_size: None)  # 1 row
    stage.main()
    summary = json.loads((tmp_path / "data.json").read_text())
    assert summary["source"] == {"hub_dataset": "someone/qa", "requested_revision": "main", "commit_sha": SHA}
    assert "unpinned" in capsys.readouterr().err


def test_bad_data_fails_clearly_and_writes_nothing(tmp_path, base_model_dir):
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(10)] + ['{"question": "Q"'])
    result = prepare(tmp_path, base_model_dir, params_file(tmp_path, source))
    assert result.returncode != 0
    assert "qa.jsonl:11: malformed JSON" in result.stderr
    assert not (tmp_path / "processed").exists() and not (tmp_path / "data.json").exists()
    assert not list(tmp_path.glob(".processed.tmp-*"))


def test_split_smaller_than_batch_is_refused(tmp_path, base_model_dir):
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(20)])
    result = prepare(tmp_path, base_model_dir, params_file(tmp_path, source, batch_size=4))
    assert result.returncode != 0 and "fewer than train.batch_size=4" in result.stderr
    assert not (tmp_path / "processed").exists()


def test_template_dropping_the_system_prompt_is_refused_until_overridden(tmp_path, base_model_dir):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_model_dir / name, model / name)
    override_chat_template(model, DROPS_SYSTEM)
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(40)])
    result = prepare(tmp_path, model, params_file(tmp_path, source))
    assert result.returncode != 0
    assert "drops the system message" in result.stderr and "model.chat_template" in result.stderr

    good = json.loads((base_model_dir / "tokenizer_config.json").read_text())["chat_template"]
    override_chat_template(model, good)
    assert prepare(tmp_path, model, params_file(tmp_path, source)).returncode == 0


def test_missing_model_folder_is_a_clear_error(tmp_path):
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(20)])
    result = prepare(tmp_path, tmp_path / "no-model", params_file(tmp_path, source))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"prepare: {tmp_path / 'no-model'}: no model folder" in result.stderr
    assert "dvc repro base_model" in result.stderr


# ------------------------------------------------------------------------------ the rewrite task
def rewrite_pair(post: int, i: int) -> dict:
    draft = f"Post {post}, passage {i}: the sailor reefs early and checks the barometer every hour."
    original = f"Post {post}, passage {i}: I reef early, and I read my barometer every hour, always."
    return {"conversation": [{"role": "user", "content": f"Rewrite this in my voice:\n\n{draft}"},
                             {"role": "assistant", "content": original}],
            "task": "rewrite", "post_id": f"post-{post}.md", "passage_id": f"p{i}"}


def prepare_task(tmp_path, model_dir, source, rewrites, out, **data):
    params = params_file(tmp_path, source, batch_size=2, max_seq_length=512, **data)
    return run_stage("prepare.py", "--params", str(params), "--model", str(model_dir),
                     "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json"),
                     "--rewrites", str(rewrites))


def read_rows(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_task_both_adds_rewrites_split_by_post_and_leaves_the_qa_samples_as_they_were(tmp_path, base_model_dir):
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(40)])
    rewrites = write_jsonl(tmp_path / "rewrites.jsonl", [rewrite_pair(p, i) for p in range(6) for i in range(3)])
    assert prepare_task(tmp_path, base_model_dir, source, rewrites, "qa_only", task="qa").returncode == 0
    result = prepare_task(tmp_path, base_model_dir, source, rewrites, "both", task="both")
    assert result.returncode == 0, result.stderr
    assert "rewrite samples: train 12 / valid 3 / test 3" in result.stdout
    posts = {}
    for name in ("train", "valid", "test"):
        qa_only = (tmp_path / "qa_only" / f"{name}.jsonl").read_text().splitlines()
        lines = (tmp_path / "both" / f"{name}.jsonl").read_text().splitlines()
        # the Q&A samples first, byte for byte those of task qa; then the rewrites, marked
        assert lines[:len(qa_only)] == qa_only
        rows = [json.loads(line) for line in lines[len(qa_only):]]
        assert rows and all(r["task"] == "rewrite" for r in rows)
        for r in rows:
            system, user, assistant = r["messages"]
            assert system == {"role": "system", "content": PERSONA}
            assert user["content"].startswith("Rewrite this in my voice:\n\nPost ")
            assert assistant["content"].split(":")[0] == user["content"].split("\n\n")[1].split(":")[0]
            posts.setdefault(assistant["content"].split(",")[0], set()).add(name)
    # every post's passages in one split only: 6 posts, 3 passages each
    assert len(posts) == 6 and all(len(splits) == 1 for splits in posts.values())
    summary = json.loads((tmp_path / "both.json").read_text())
    assert summary["task"] == "both" and summary["total"] == 58
    assert summary["tasks"] == {"train": {"qa": 32, "rewrite": 12}, "valid": {"qa": 4, "rewrite": 3},
                                "test": {"qa": 4, "rewrite": 3}}
    assert summary["source"]["rewrite"] == {"path": str(rewrites), "pairs": 18}

    # rewrite_ratio: at most 0.1 rewrite training samples per Q&A one, a seeded draw
    result = prepare_task(tmp_path, base_model_dir, source, rewrites, "capped", task="both", rewrite_ratio=0.1)
    assert result.returncode == 0, result.stderr
    capped = [r for r in read_rows(tmp_path / "capped", "train") if r.get("task") == "rewrite"]
    both = [r for r in read_rows(tmp_path / "both", "train") if r.get("task") == "rewrite"]
    assert len(capped) == 3 and all(r in both for r in capped)
    assert read_rows(tmp_path / "capped", "test") == read_rows(tmp_path / "both", "test")

    # task rewrite: the rewrites alone, the Q&A source not even read
    result = prepare_task(tmp_path, base_model_dir, tmp_path / "absent.jsonl", rewrites, "rw", task="rewrite")
    assert result.returncode == 0, result.stderr
    assert all(r.get("task") == "rewrite" for name in ("train", "valid", "test")
               for r in read_rows(tmp_path / "rw", name))


def test_no_rewrite_pairs_refuses_task_rewrite_and_warns_for_both(tmp_path, base_model_dir):
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(40)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused = prepare_task(tmp_path, base_model_dir, source, empty, "rw", task="rewrite")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "holds no rewrite pair" in refused.stderr and "set data.task to qa" in refused.stderr
    assert not (tmp_path / "rw").exists()
    warned = prepare_task(tmp_path, base_model_dir, source, empty, "both", task="both")
    assert warned.returncode == 0 and "training on Q&A only" in warned.stderr
    missing = prepare_task(tmp_path, base_model_dir, source, tmp_path / "none.jsonl", "m", task="both")
    assert missing.returncode == 1 and "dvc repro rewrite" in missing.stderr
