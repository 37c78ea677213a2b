"""Quantized bases (QLoRA): a tiny random Llama and a tiny random Phi-3, quantized to 4 and 8
bits with mlx-lm, train LoRA adapters on the quantized weights (the loss falls, the quantized
weights stay as they were), fuse dequantized within fuse.logit_tolerance, and round-trip
through GGUF; the fused-quantized traps (adapters rounded away by a re-quantizing fuse, or
dropped) are caught by the fuse check; a quantized source is taken as it is."""
import json
import shutil
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import save

from voicetune.export.gguf import _fused_weights, verify as verify_gguf, write_gguf
from voicetune.models import fusion
from voicetune.models.base_model import override_chat_template
from voicetune.models.fusion import fuse, verify
from voicetune.models.lora import apply_lora, parameter_counts
from voicetune.models.quantize import QuantizeError, check_request, folder_quantization, quantize_folder
from voicetune.train.checkpoint import Checkpoint
from voicetune.train.sft import TrainConfig, train

from tests.conftest import PERSONA, ROOT
from tests.harness.training import ATTENTION, train_params

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
FUSE_TOLERANCE = PARAMS["fuse"]["logit_tolerance"]
GGUF_TOLERANCE = PARAMS["gguf"]["logit_tolerance"]["f16"]
PHI3_KEYS = ["self_attn.qkv_proj", "self_attn.o_proj"]


@pytest.fixture(scope="module")
def float_models(tiny_model_dir, tiny_phi3_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama, and the tiny Phi-3 with templates/phi3.jinja (which keeps the persona)."""
    phi3 = tmp_path_factory.mktemp("phi3") / "model"
    shutil.copytree(tiny_phi3_dir, phi3)
    override_chat_template(phi3, (ROOT / "templates/phi3.jinja").read_text())
    return {"llama": tiny_model_dir, "phi3": phi3}


def quantized_copy(source: Path, dest: Path, bits: int, group_size: int) -> Path:
    shutil.copytree(source, dest)
    assert quantize_folder(dest, bits, group_size) == {"bits": bits, "group_size": group_size}
    return dest


def adapter_folder(model, adapter_config: dict, weights: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


def logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    model, _ = load(str(model_dir))
    return np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))


# ------------------------------------------------------------------ the whole path
CASES = [("llama", 4, 64), ("llama", 8, 64), ("phi3", 4, 32), ("phi3", 8, 32)]


@pytest.mark.parametrize("arch,bits,group_size", CASES)
def test_qlora_trains_fuses_and_exports(arch, bits, group_size, float_models, tiny_data_dir,
                                        tmp_path):
    source = float_models[arch]
    base = quantized_copy(source, tmp_path / "base", bits, group_size)
    config = json.loads((base / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    float_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    quant_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    # float32 weights -> bits per weight + a float32 scale and bias per group
    assert quant_bytes / float_bytes == pytest.approx((bits + 64 / group_size) / 32, rel=0.05)
    # quantized, the model is close to the float one, and closer at 8 bits than at 4
    tokens = load(str(base))[1].encode("Should I reef before a squall?")
    error = np.abs(logits(base, tokens) - logits(source, tokens)).max()
    assert 0 < error < {4: 2.0, 8: 0.2}[bits]

    # QLoRA: the adapters wrap the quantized layers and are the only trainable weights
    model, tokenizer = load(str(base))
    model.set_dtype(mx.float32)
    mx.random.seed(0)
    keys = PHI3_KEYS if arch == "phi3" else ATTENTION
    adapter_config = apply_lora(model, 4, 20.0, 0.0, keys, -1)
    lora_layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert lora_layers and all(isinstance(m.linear, nn.QuantizedLinear) for m in lora_layers)
    assert all(m.linear.bits == bits for m in lora_layers)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora_" not in k}
    trainable, total = parameter_counts(model)
    # rank 4 x (d_in + d_out), d_in unpacked from the uint32 words
    assert trainable == sum(4 * (m.linear.weight.shape[0] + m.linear.weight.shape[1] * 32 // bits)
                            for m in lora_layers)
    assert total == parameter_counts(load_lora_float(source, keys))[1]

    train_set, valid_set, _ = load_local_dataset(tiny_data_dir, tokenizer,
                                                 types.SimpleNamespace(mask_prompt=True))
    cfg = TrainConfig.from_params(train_params(iters=10, steps_per_eval=5, save_every=10,
                                               early_stopping={"patience": 9, "min_delta": 0})["train"])
    checkpoint = Checkpoint(tmp_path / "checkpoint", "qlora")
    result = train(model, CacheDataset(train_set), CacheDataset(valid_set), cfg, checkpoint)
    assert result.best["val_loss"] < result.base["val_loss"] - 0.05  # the adapters learned
    after = dict(tree_flatten(model.parameters()))
    for key, value in frozen.items():  # the quantized weights (and their scales) did not move
        assert np.array_equal(np.array(after[key]), value), key
    adapters = adapter_folder(model, adapter_config, dict(mx.load(str(checkpoint.best_file))),
                              tmp_path / "adapters")

    # fused dequantized: a float model, equal to base + adapters within fuse.logit_tolerance
    fused = tmp_path / "fused"
    fused.mkdir()
    assert fuse(base, adapters, fused) == {"bits": bits, "group_size": group_size}
    fused_config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in fused_config and "quantization_config" not in fused_config
    assert all(w.dtype == mx.float32 for w in mx.load(str(fused / "model.safetensors")).values())
    test_rows = [json.loads(line) for line in (tiny_data_dir / "test.jsonl").open()][:2]
    prompts = [tokenizer.apply_chat_template(r["messages"][:2], add_generation_prompt=True)
               for r in test_rows]
    report = verify(base, adapters, fused, prompts, FUSE_TOLERANCE, 8)
    assert report["ok"], report["problems"]
    assert report["max_abs_logit_diff_fused_vs_lora"] <= FUSE_TOLERANCE
    assert report["max_abs_logit_diff_fused_vs_base"] > 100 * FUSE_TOLERANCE

    # GGUF: from the dequantized fused folder, read back with the same logits
    gguf_file = tmp_path / "model.gguf"
    write_gguf(fused, gguf_file, "f16")
    conversations = [r["messages"][:2] for r in test_rows]
    back = verify_gguf(fused, gguf_file, conversations, GGUF_TOLERANCE, PERSONA)
    assert back["problems"] == [] and 0 < back["max_abs_logit_diff"] <= GGUF_TOLERANCE


def load_lora_float(source: Path, keys: list[str]):
    model, _ = load(str(source))
    apply_lora(model, 4, 20.0, 0.0, keys, -1)
    return model


def test_gguf_dequantizes_a_quantized_folder(float_models, tmp_path):
    """Exported as it is, a quantized folder's packed uint32 weights would be written as
    numbers (mlx-lm's U32 trap): the export dequantizes them first."""
    base = quantized_copy(float_models["llama"], tmp_path / "q4", 4, 64)
    weights = _fused_weights(base)
    assert not any(name.endswith((".scales", ".biases")) for name in weights)
    model, _ = load(str(base))
    layer = model.model.layers[0].self_attn.q_proj
    expected = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4)
    got = weights["model.layers.0.self_attn.q_proj.weight"]
    assert got.shape == tuple(expected.shape) and np.allclose(got, np.array(expected))

    out = tmp_path / "q4.gguf"
    write_gguf(base, out, "f16")
    report = verify_gguf(base, out, [[{"role": "user", "content": "Should I reef?"}]],
                         GGUF_TOLERANCE, PERSONA)
    assert report["problems"] == []


# ------------------------------------------------------------------ the fused-quantized traps
@pytest.fixture(scope="module")
def small_adapters(float_models, tmp_path_factory):
    """A 4-bit base and adapters whose update is small next to the 4-bit grid's step (as a
    fine-tune's often is): they change the logits, but rounding them onto the grid loses them."""
    root = tmp_path_factory.mktemp("trap")
    base = quantized_copy(float_models["llama"], root / "base", 4, 64)
    model, tokenizer = load(str(base))
    mx.random.seed(1)
    config = apply_lora(model, 4, 20.0, 0.0, ATTENTION, -1)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 2e-4 * mx.random.normal(m.lora_b.shape)
    adapters = adapter_folder(model, config, dict(tree_flatten(model.trainable_parameters())),
                              root / "adapters")
    prompts = [tokenizer.encode(t) for t in ("Should I reef before a squall?", "Fair winds!")]
    return base, adapters, prompts


def requantizing_fuse(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """mlx-lm's default fuse on a quantized base: the updated weights re-quantized."""
    model, tokenizer, config = load(str(base_dir), adapter_path=str(adapter_dir), return_config=True)
    fused = [(n, m.fuse()) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    model.update_modules(tree_unflatten(fused))
    save(out_dir, base_dir, model, tokenizer, config, donate_model=False)


def test_the_fuse_keeps_small_adapters_that_requantizing_loses(small_adapters, tmp_path):
    base, adapters, prompts = small_adapters
    ours = tmp_path / "ours"
    ours.mkdir()
    fuse(base, adapters, ours)
    report = verify(base, adapters, ours, prompts, FUSE_TOLERANCE, 6)
    assert report["ok"], report["problems"]

    requantized = tmp_path / "requantized"
    requantized.mkdir()
    requantizing_fuse(base, adapters, requantized)
    assert "quantization" in json.loads((requantized / "config.json").read_text())
    report = verify(base, adapters, requantized, prompts, FUSE_TOLERANCE, 6)
    # most of the update is rounded away: the re-quantized model is nearer the base than the
    # model that was trained, and the check refuses it
    assert report["max_abs_logit_diff_fused_vs_lora"] > FUSE_TOLERANCE
    assert not report["ok"] and "differ from base+adapters" in report["problems"][0]


def test_a_fuse_that_drops_the_adapters_is_refused(small_adapters, tmp_path, monkeypatch):
    base, adapters, prompts = small_adapters
    monkeypatch.setattr(LoRALinear, "fuse", lambda self, dequantize=False: self.linear)
    out = tmp_path / "fused"
    out.mkdir()
    fusion.fuse(base, adapters, out)
    report = verify(base, adapters, out, prompts, FUSE_TOLERANCE, 6)
    assert not report["ok"]
    assert any("adapters were not fused in" in p for p in report["problems"])


# ------------------------------------------------------------------ a quantized source
def test_a_quantized_source_is_taken_as_it_is_or_refused_with_the_fix(float_models, tmp_path):
    q4 = quantized_copy(float_models["llama"], tmp_path / "q4", 4, 64)
    existing = folder_quantization(q4)
    assert check_request(None, None, 64) is False            # a float source, as it comes
    assert check_request(None, 8, 64) is True                # a float source, quantized here
    assert check_request(existing, None, 64) is False        # quantized at the source: as it is
    assert check_request(existing, 4, 64) is False           # ... and said the same way
    with pytest.raises(QuantizeError) as err:
        check_request(existing, 8, 64)
    assert "already quantized: 4-bit (group size 64)" in str(err.value)
    assert "model.quantize: null" in str(err.value)
    with pytest.raises(QuantizeError):
        check_request(existing, 4, 32)


# ------------------------------------------------------------------ the stages
def test_model_quantize_runs_through_the_stages(tiny_model_dir, tmp_path):
    """model.quantize: 4 in a scratch project: base_model quantizes and records it, train
    trains on it, fuse dequantizes (and says so), the GGUF stage exports and verifies, and
    evaluate@lora answers."""
    from tests.harness.project import dvc, make_tiny_project, set_param

    project = make_tiny_project(tmp_path / "repo", tiny_model_dir)
    set_param(project, "model", "quantize", 4)
    dvc(project, "repro", "gguf", "evaluate@lora")

    base = project / "models/base"
    assert folder_quantization(base) == {"bits": 4, "group_size": 64}
    assert json.loads((base / "source.json").read_text())["quantization"] == \
        {"bits": 4, "group_size": 64, "by": "voicetune"}
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["best_val_loss"] < train["base_val_loss"]
    fused = json.loads((project / "metrics/fuse.json").read_text())
    assert fused["ok"] and fused["fused_weights"] == "dequantized"
    assert fused["base_quantization"] == {"bits": 4, "group_size": 64}
    assert folder_quantization(project / "models/fused") is None
    assert json.loads((project / "metrics/gguf.json").read_text())["problems"] == []
    assert json.loads((project / "metrics/eval_lora.json").read_text())["n"] == 4
