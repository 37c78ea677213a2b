"""GGUF export: the file holds the same model (logits, token ids, chat template, end of turn)
for both architectures and both types, wrong exports are refused, the Modelfile matches the
chat format, and the stage keeps its last good outputs when the check fails."""
import copy
import json
import re
import shutil
from pathlib import Path

import gguf
import pytest
import yaml

from voicetune.export import gguf as gguf_export
from voicetune.models.base_model import override_chat_template
from voicetune.export.gguf import GgufExportError, verify, write_gguf

from tests.conftest import PERSONA, ROOT, run_stage

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
TOLERANCE = PARAMS["gguf"]["logit_tolerance"]


@pytest.fixture(scope="module")
def phi3_dir(tiny_phi3_dir, tmp_path_factory) -> Path:
    """The tiny Phi-3 with templates/phi3.jinja, which keeps the persona (the GGUF's drops it)."""
    out = tmp_path_factory.mktemp("phi3") / "model"
    shutil.copytree(tiny_phi3_dir, out)
    override_chat_template(out, (ROOT / "templates/phi3.jinja").read_text())
    return out


@pytest.fixture(scope="module")
def conversations(tiny_data_dir) -> list:
    return [json.loads(line)["messages"] for line in open(tiny_data_dir / "test.jsonl")][:2]


def field(reader, key):
    return reader.fields[key].contents()


def render_like_ollama(template: str, system: str, prompt: str) -> str:
    """What Ollama's legacy .System/.Prompt/.Response template renders for a first turn."""
    text = template.split("{{ .Response }}")[0]
    for var, value in (("System", system), ("Prompt", prompt)):
        text = re.sub(r"\{\{ if \.%s \}\}(.*?)\{\{ end \}\}" % var,
                      lambda m: m.group(1) if value else "", text, flags=re.S)
        text = text.replace("{{ .%s }}" % var, value)
    return text


# ------------------------------------------------------------------ round trips
CASES = [("llama", "f16"), ("llama", "q8_0"), ("phi3", "f16"), ("phi3", "q8_0")]
EXPECTED = {  # arch -> tokenizer model, pre-tokenizer, end-of-turn token, chat format
    "llama": ("gpt2", "smollm", "<|im_end|>", "chatml"),
    "phi3": ("llama", "default", "<|end|>", "phi3"),
}


@pytest.mark.parametrize("arch,qtype", CASES)
def test_round_trip_keeps_model_tokenizer_and_chat_format(arch, qtype, tiny_model_dir, phi3_dir,
                                                          conversations, tmp_path):
    from mlx_lm.utils import load_tokenizer

    folder = tiny_model_dir if arch == "llama" else phi3_dir
    out = tmp_path / f"model-{qtype}.gguf"
    info = write_gguf(folder, out, qtype)
    hf = load_tokenizer(folder)._tokenizer

    reader = gguf.GGUFReader(str(out))
    model, pre, eot, fmt = EXPECTED[arch]
    assert field(reader, "general.architecture") == arch
    assert field(reader, "tokenizer.ggml.model") == model
    assert field(reader, "tokenizer.ggml.pre") == pre
    assert field(reader, "tokenizer.chat_template") == hf.chat_template
    eot_id = hf.convert_tokens_to_ids(eot)
    assert field(reader, "tokenizer.ggml.eos_token_id") == eot_id == info["end_of_turn_id"]
    assert field(reader, "tokenizer.ggml.bos_token_id") == hf.bos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is (arch == "phi3")
    assert len(field(reader, "tokenizer.ggml.tokens")) == json.loads(
        (folder / "config.json").read_text())["vocab_size"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_output.weight"] == qtype.upper()
    assert ("blk.0.attn_qkv.weight" in types) is (arch == "phi3")
    assert ("blk.0.attn_q.weight" in types) is (arch == "llama")

    report = verify(folder, out, conversations, TOLERANCE[qtype], PERSONA)
    assert report["problems"] == []
    assert 0 < report["max_abs_logit_diff"] <= TOLERANCE[qtype]
    assert report["tokenizer_ids_identical"] == report["tokenizer_texts"] >= 9
    assert report["chat_template_identical"]

    # the Modelfile: Ollama renders the same prompt as the model's own template
    assert gguf_export.ollama_format(hf, PERSONA, info["add_bos"]) == fmt
    text = gguf_export.modelfile(out.name, PERSONA, fmt, info["stop"])
    assert f"FROM ./{out.name}\n" in text
    assert f'SYSTEM """{PERSONA}"""' in text
    assert f'PARAMETER stop "{eot}"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    question = "Should I reef?"
    jinja = hf.apply_chat_template([{"role": "system", "content": PERSONA},
                                    {"role": "user", "content": question}],
                                   tokenize=False, add_generation_prompt=True)
    assert render_like_ollama(template, PERSONA, question) == jinja.removeprefix(
        hf.bos_token if info["add_bos"] else "")
    assert template.endswith("{{ .Response }}" + eot + "\n")


def test_the_file_is_byte_identical_every_time(tiny_model_dir, tmp_path):
    write_gguf(tiny_model_dir, tmp_path / "a.gguf", "f16")
    write_gguf(tiny_model_dir, tmp_path / "b.gguf", "f16")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# ------------------------------------------------------------------ wrong exports are caught
def test_unpermuted_q_k_rows_are_caught_by_the_logits(tiny_model_dir, conversations, tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, n_heads: w)
    write_gguf(tiny_model_dir, tmp_path / "bad.gguf", "f16")
    report = verify(tiny_model_dir, tmp_path / "bad.gguf", conversations, TOLERANCE["f16"], PERSONA)
    assert report["max_abs_logit_diff"] > 2 * TOLERANCE["f16"]
    assert [p for p in report["problems"] if p.startswith("logits of the GGUF differ")]


def test_wrong_sentencepiece_scores_are_caught_by_the_token_ids(phi3_dir, conversations, tmp_path,
                                                                monkeypatch):
    # equal scores: llama.cpp would merge longest pieces first instead of in the BPE's order
    monkeypatch.setattr(gguf_export, "_spm_scores", lambda tokens, merges: [0.0] * len(tokens))
    write_gguf(phi3_dir, tmp_path / "bad.gguf", "f16")
    report = verify(phi3_dir, tmp_path / "bad.gguf", conversations, TOLERANCE["f16"], PERSONA)
    assert report["tokenizer_ids_identical"] < report["tokenizer_texts"]
    assert any("other token ids" in p for p in report["problems"])


def test_a_template_that_drops_the_persona_gets_no_modelfile(tiny_phi3_dir):
    from mlx_lm.utils import load_tokenizer

    with pytest.raises(GgufExportError, match="none of the chat formats"):
        gguf_export.ollama_format(load_tokenizer(tiny_phi3_dir)._tokenizer, PERSONA, True)


def test_an_unsupported_architecture_is_a_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(GgufExportError, match=r"model_type 'gemma2' cannot be exported .*"
                                              r"convert_hf_to_gguf"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "f16")


# ------------------------------------------------------------------ the stage
def stage_params(tmp_path, **tolerance) -> Path:
    params = copy.deepcopy(PARAMS)
    params["gguf"]["verify_prompts"] = 1
    params["gguf"]["logit_tolerance"].update(tolerance)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_writes_a_verified_file_and_keeps_it_when_a_rerun_fails(tiny_model_dir,
                                                                      tiny_data_dir, tmp_path):
    args = ["--fused", str(tiny_model_dir), "--test", str(tiny_data_dir / "test.jsonl"),
            "--out", "models/gguf", "--metrics", "metrics/gguf.json"]
    done = run_stage("export_gguf.py", "--params", str(stage_params(tmp_path)), *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "models/gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-f16.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert PARAMS["data"]["system_prompt"] in modelfile  # the persona of params.yaml
    text = (tmp_path / "metrics/gguf.json").read_text()
    metrics = json.loads(text)
    assert metrics["type"] == "f16" and metrics["file"] == "model-f16.gguf"
    assert metrics["file_size_bytes"] == (out / "model-f16.gguf").stat().st_size
    assert metrics["max_abs_logit_diff"] <= metrics["logit_tolerance"] == TOLERANCE["f16"]
    assert metrics["tokenizer_ids_identical"] == metrics["tokenizer_texts"]
    assert str(tmp_path) not in text and "/tmp" not in text

    good = (out / "model-f16.gguf").read_bytes()
    failed = run_stage("export_gguf.py", "--params", str(stage_params(tmp_path, f16=1e-9)), *args,
                       cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.startswith("export_gguf: models/gguf/model-f16.gguf rejected:")
    assert "gguf.logit_tolerance.f16" in failed.stderr and "Traceback" not in failed.stderr
    assert (out / "model-f16.gguf").read_bytes() == good
    assert (tmp_path / "metrics/gguf.json").read_text() == text
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["gguf"]  # no temp folder
