"""The speed benchmark's arithmetic (FLOPs per token, the ceiling) and its MLX worker."""
import json
import math

import yaml

import mlx.nn as nn
import pytest
from mlx_lm.utils import _get_classes

from voicetune.bench import mlx_train_worker, portable_result, shown_path, training_flops_per_token
from voicetune.estimate import linear_shapes

from .conftest import ROOT

PHI3 = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32064,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096}


def real_linear_shapes(config):
    model_class, args_class = _get_classes(config)
    block = model_class(args_class.from_dict(config)).layers[0]
    return {name: (m.weight.shape[1], m.weight.shape[0]) for name, m in block.named_modules()
            if isinstance(m, nn.Linear)}


def test_linear_shapes_match_the_models(tiny_model_dir):
    llama = json.loads((tiny_model_dir / "config.json").read_text())
    assert linear_shapes(llama) == real_linear_shapes(llama)
    assert linear_shapes(PHI3) == real_linear_shapes(PHI3)


def test_flops_per_token():
    shapes = linear_shapes(PHI3)
    weights = 2 * sum(i * o for i, o in shapes.values()) + 64 * 32064
    attention = 2 * 2 * 2 * 64 * 128 / 2  # 2 layers, QK^T and AV, 2 FLOPs, mean context 64
    adapters = 2 * 8 * ((64 + 192) + (64 + 64))  # rank 8 on qkv_proj and o_proj
    expected = 4 * (weights + attention) + 6 * adapters
    got = training_flops_per_token(PHI3, ["self_attn.qkv_proj", "self_attn.o_proj"], 8, 128)
    assert got == pytest.approx(expected)
    # longer sequences cost more per token (attention), more adapters cost more
    assert training_flops_per_token(PHI3, ["self_attn.o_proj"], 8, 256) > \
        training_flops_per_token(PHI3, ["self_attn.o_proj"], 8, 128)


def test_mlx_worker_trains(tiny_model_dir):
    result = mlx_train_worker(str(tiny_model_dir), ["self_attn.q_proj", "self_attn.v_proj"],
                              batch=2, seq_len=32, steps=2, warmup=1, grad_checkpoint=False)
    assert len(result["step_times"]) == 2
    assert result["tokens_per_s"] == pytest.approx(2 * 32 / result["seconds_per_step"])
    assert math.isfinite(result["last_loss"]) and result["last_loss"] > 0
    assert result["peak_memory_gb"] > 0


# ------------------------------------------------------------------ no machine paths committed
MACHINE_PATHS = ("/work/", "/tmp/", "/root/", "/home/", "/Users/", "/private/", "/var/folders/")


def strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def test_committed_results_hold_no_machine_paths():
    files = sorted((ROOT / "metrics").glob("*.json")) + [ROOT / "dvc.lock"]
    assert ROOT / "metrics/bench.json" in files
    for f in files:
        data = yaml.safe_load(f.read_text()) if f.suffix == ".lock" else json.loads(f.read_text())
        found = [s for s in strings(data) if s.startswith(MACHINE_PATHS) or any(f" {p}" in s for p in MACHINE_PATHS)]
        assert not found, f"{f.relative_to(ROOT)} holds this machine's paths: {found}"


def test_bench_shows_paths_without_the_machine(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert shown_path("/work/main/.venv/lib/python3.11/site-packages/cmeel.prefix/lib/libopenblas.so.0") \
        == "libopenblas.so.0"
    assert shown_path(tmp_path / "models/base") == "models/base"
    assert shown_path("models/base") == "models/base" and shown_path(None) is None
    result = portable_result({"framework": "torch", "model": "/tmp/tmp_k416lp4/phi3-bench", "threads": 2},
                             "phi3-random-512x8")
    assert result == {"framework": "torch", "model": "phi3-random-512x8", "threads": 2}
