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
                           "valid_ratio": 0.1, "test_ratio": 0.1, "split_by": "exchange", **data})
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
