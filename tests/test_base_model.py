"""model.source resolution: each kind of source, and clear errors for the bad ones."""
import json
import shutil
import time

import pytest

from voicetune.base_model import (ModelSourceError, materialize, read_chat_template_param,
                                  write_generation_config)


def test_local_folder_is_copied(tmp_path, base_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    materialize(str(base_model_dir), None, out)
    assert (out / "model.safetensors").stat().st_size == (base_model_dir / "model.safetensors").stat().st_size


def test_incomplete_local_folder_is_refused(tmp_path, base_model_dir):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(base_model_dir / "config.json", src)
    with pytest.raises(ModelSourceError, match=r"missing \*\.safetensors weights, tokenizer.json"):
        materialize(str(src), None, tmp_path)


def test_unknown_embedded_model(tmp_path):
    with pytest.raises(ModelSourceError, match="embedded:smollm2-135m-instruct"):
        materialize("embedded:gpt-5", None, tmp_path)


def test_hub_repo_needs_a_pinned_revision(tmp_path):
    with pytest.raises(ModelSourceError, match="pin model.revision"):
        materialize("microsoft/Phi-3-mini-4k-instruct", None, tmp_path)


def test_hub_download_offline_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as err:
        materialize("microsoft/Phi-3-mini-4k-instruct", "0a67737cc96d2554230f90338b163bc6380a2a85", tmp_path)
    assert time.monotonic() - start < 30
    assert "microsoft/Phi-3-mini-4k-instruct" in str(err.value) and "local folder" in str(err.value)


def test_not_a_source(tmp_path):
    with pytest.raises(ModelSourceError, match="neither an embedded model"):
        materialize("no/such/path/here", None, tmp_path)


def test_chat_template_param(tmp_path):
    assert read_chat_template_param(None) is None
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert read_chat_template_param(str(tmp_path / "t.jinja")) == "{{ messages }}"
    with pytest.raises(ModelSourceError, match="is not a file"):
        read_chat_template_param(str(tmp_path / "missing.jinja"))


def test_generation_config_lists_end_of_turn_ids(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 32000, "bos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 32000, "do_sample": False}))
    assert write_generation_config(tmp_path, [32007]) == [32000, 32007]
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"eos_token_id": [32000, 32007], "do_sample": False, "bos_token_id": 1}
