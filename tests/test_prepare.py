"""Stage prepare end to end: outputs, determinism, nothing written on failure."""
import hashlib
import json
import shutil

import yaml

from voicetune.base_model import override_chat_template

from .conftest import qa, run_stage, write_jsonl
from .test_chat_format import DROPS_SYSTEM

PERSONA = "You are Captain Tilly Brask."


def params_file(tmp_path, source, batch_size=2, **data):
    params = {
        "data": {"source": str(source), "system_prompt": PERSONA, "seed": 7, "valid_ratio": 0.1,
                 "test_ratio": 0.1, "split_by": "exchange", **data},
        "train": {"batch_size": batch_size, "iters": 100, "max_seq_length": 43},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def prepare(tmp_path, model_dir, params, out="processed"):
    return run_stage("prepare.py", "--params", str(params), "--model", str(model_dir),
                     "--out", str(tmp_path / out), "--metrics", str(tmp_path / out / "../data.json"))


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_prepare_writes_chat_splits_and_summary(tmp_path, base_model_dir):
    source = write_jsonl(tmp_path / "qa.jsonl", [qa(i) for i in range(40)] + [qa(99, "Question number 3: what about knots?")])
    result = prepare(tmp_path, base_model_dir, params_file(tmp_path, source))
    assert result.returncode == 0, result.stderr
    assert "train 32 / valid 4 / test 4" in result.stdout and "1 duplicate questions dropped" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "processed/train.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    assert all(r["messages"][0]["content"] == PERSONA for r in rows)
    summary = json.loads((tmp_path / "data.json").read_text())
    assert summary["samples"] == {"train": 32, "valid": 4, "test": 4}
    assert summary["duplicates_dropped"] == 1
    assert summary["steps_per_epoch"] == 16 and summary["epochs"] == 6.25
    # ChatML overhead + persona + question + answer: 44 to 46 tokens each, over max_seq_length 43
    assert 40 < summary["tokens"]["p50"] <= summary["tokens"]["max"] < 60
    assert summary["tokens"]["over_max_seq_length"] == 40 and summary["train_over_max_seq_length"] == 32

    first = digest(tmp_path / "processed")
    assert prepare(tmp_path, base_model_dir, params_file(tmp_path, source)).returncode == 0
    assert digest(tmp_path / "processed") == first


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
