"""The speed benchmark's arithmetic (FLOPs per token, the ceiling), its summaries and
tables (MLX stock / MLX fast path / PyTorch), and its MLX workers. No timing is asserted and
no benchmark is run: the figures here are made up."""
import json
import math
import sys
import types

import yaml

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.utils import _get_classes

import voicetune
from voicetune.bench import training as bench, workers
from voicetune.bench.ceiling import CeilingError, best_probe, efficiency, training_flops_per_token
from voicetune.bench.kernel_timing import kernels, profile_table, time_kernels
from voicetune.bench.summary import portable_result, print_report, summarize_generate, summarize_train, targets
from voicetune.bench.training import shown_path, worker_command
from voicetune.bench.workers import FRAMEWORKS, mlx_train_worker
from voicetune.models.memory import linear_shapes

from tests.conftest import ROOT

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


@pytest.fixture
def stub_fastpath(monkeypatch):
    """voicetune.core.kernels replaced by a stub with its API: built-in kernels, and an enable()
    that records its setting and (when on) swaps mlx-lm's llama.swiglu, as the real one."""
    calls = []
    stub = types.ModuleType("voicetune.core.kernels")

    def enable(setting="auto"):
        calls.append(setting)
        if setting == "on":
            monkeypatch.setattr(llama, "swiglu", lambda gate, x: nn.silu(gate) * x)
        return setting == "on"

    stub.enable, stub.calls = enable, calls
    stub.exp, stub.sigmoid, stub.silu = mx.exp, mx.sigmoid, nn.silu
    stub.softmax = lambda x, axis=-1: mx.softmax(x, axis=axis)
    stub.swiglu = lambda gate, x: nn.silu(gate) * x
    stub.cross_entropy = nn.losses.cross_entropy
    stub.attention = lambda q, k, v, scale, mask: mx.fast.scaled_dot_product_attention(
        q, k, v, scale=scale, mask=mask)
    stub.dropout_mask = lambda shape, p, key=None: mx.random.bernoulli(p, shape, key=key)
    monkeypatch.setitem(sys.modules, "voicetune.core.kernels", stub)
    monkeypatch.setattr(voicetune.core, "kernels", stub, raising=False)
    monkeypatch.setattr(workers, "mlx_matmul_probe", lambda: 123.0)  # no 2048^2 products in tests
    return stub


@pytest.mark.parametrize("setting", ["off", "on"])
def test_mlx_worker_trains_with_the_fast_path_flag(tiny_model_dir, stub_fastpath, setting):
    result = mlx_train_worker(str(tiny_model_dir), ["self_attn.q_proj", "self_attn.v_proj"],
                              batch=2, seq_len=32, steps=2, warmup=1, grad_checkpoint=False,
                              fastpath=setting)
    assert stub_fastpath.calls == [setting]  # before the model was built
    assert result["fastpath"] == setting and result["fastpath_active"] == (setting == "on")
    assert result["fastpath_swapped"] == (["llama.swiglu"] if setting == "on" else [])
    assert result["matmul_gflops"] == 123.0  # the worker's probe joins the ceiling's
    assert len(result["step_times"]) == 2
    assert result["tokens_per_s"] == pytest.approx(2 * 32 / result["seconds_per_step"])
    assert math.isfinite(result["last_loss"]) and result["last_loss"] > 0
    assert result["peak_memory_gb"] > 0


def test_each_worker_process_gets_its_fast_path_flag(monkeypatch, capsys):
    stock, fast, torch = (worker_command(fw, "train", "m", ["--keys", "k"]) for fw in FRAMEWORKS)
    assert stock[stock.index("--fastpath") + 1] == "off"
    assert fast[fast.index("--fastpath") + 1] == "on"
    assert "voicetune.bench.torch_peft" in torch and "--fastpath" not in torch
    assert "--generate" in worker_command("torch", "generate", "m", [])
    # ... and the worker's command line hands it to the worker function
    seen = {}
    monkeypatch.setattr(bench, "mlx_train_worker", lambda *a, **kw: seen.update(kw) or {"ok": 1})
    monkeypatch.setattr(bench, "mlx_generate_worker", lambda *a, **kw: seen.update(gen=kw) or {"ok": 1})
    bench.main(fast[fast.index("--worker"):])
    assert seen["fastpath"] == "on" and json.loads(capsys.readouterr().out) == {"ok": 1}
    bench.main(["--worker", "generate", "--fastpath", "off", "--model", "m"])
    assert seen["gen"]["fastpath"] == "off"


# ------------------------------------------------------------------ the ceiling
FLOPS = 1e9  # per token: a ceiling of 100 tokens/s at 100 GFLOP/s


def ceiling(gflops=100.0):
    return {"tokens_per_s": gflops * 1e9 / FLOPS, "gflops": gflops, "flops_per_token": FLOPS}


def test_the_ceiling_is_the_best_probe():
    probes = [{"where": "start", "gflops": 106.0}, {"where": "torch worker", "gflops": 279.0},
              {"where": "before phi3 plain", "gflops": 250.0}]
    assert best_probe(probes) == {"where": "torch worker", "gflops": 279.0}
    with pytest.raises(ValueError, match="no matmul probe"):
        best_probe([])


def test_an_efficiency_above_100_percent_is_refused_with_the_reason():
    assert efficiency(50.0, ceiling(), "x") == pytest.approx(0.5)
    assert efficiency(100.0, ceiling(), "x") == pytest.approx(1.0)
    with pytest.raises(CeilingError) as err:
        efficiency(115.0, ceiling(), "smollm2 plain torch")
    message = str(err.value)
    assert "smollm2 plain torch" in message and "115%" in message and "under-read" in message
    assert "115 GFLOP/s" in message  # the rate this run implies at least


def train_run(tps, **extra):
    return {"tokens_per_s": tps, "seconds_per_step": 1024 / tps, "peak_memory_gb": 1.0, **extra}


def runs(stock=(40, 50), fast=(60, 70), torch=(50, 100)):
    return {"mlx_stock": [train_run(t, fastpath_active=False) for t in stock],
            "mlx_fast": [train_run(t, fastpath_active=True, fastpath_swapped=["llama.swiglu"]) for t in fast],
            "torch": [train_run(t) for t in torch]}


def test_train_summary_has_stock_fast_torch_side_by_side():
    notes = []
    out = summarize_train(runs(), ceiling(), "m plain", notes)
    assert set(out) == {"mlx_stock", "mlx_fast", "torch", "fast_over_torch", "stock_over_torch",
                        "fast_over_stock"}
    assert out["mlx_fast"]["tokens_per_s"] == 65 and out["mlx_fast"]["runs"] == [60, 70]
    assert out["mlx_fast"]["efficiency"] == pytest.approx(0.65)
    assert out["mlx_fast"]["fastpath_active"] and not out["mlx_stock"]["fastpath_active"]
    # ratios per repeat (each repeat ran the three back to back), then their median
    assert out["fast_over_torch"] == pytest.approx((60 / 50 + 70 / 100) / 2)
    assert out["fast_over_stock"] == pytest.approx((60 / 40 + 70 / 50) / 2)
    assert notes == []


def test_a_rate_above_the_ceiling_shows_no_efficiency_but_a_note(capsys):
    notes = []
    out = summarize_train(runs(torch=(110, 120)), ceiling(), "m plain", notes)
    assert out["torch"]["efficiency"] is None and out["mlx_fast"]["efficiency"] == pytest.approx(0.65)
    assert len(notes) == 1 and "m plain torch" in notes[0] and "under-read" in notes[0]
    report = make_report(train={"plain": out}, notes=notes)
    print_report(report)
    printed = capsys.readouterr().out
    assert "refused" in printed and "115.0%" not in printed and "NOTE: " + notes[0] in printed


def test_generation_summary_per_batch_size():
    def gen(b1, b16, **extra):
        return {"batch_1": {"tokens_per_s": b1}, "batch_16": {"tokens_per_s": b16}, **extra}
    out = summarize_generate({"mlx_stock": [gen(8, 60), gen(10, 62)],
                              "mlx_fast": [gen(9, 70), gen(11, 80)],
                              "torch": [gen(8, 70, model="/tmp/x", torch="2.13.0", threads=2)] * 2}, "m")
    assert out["mlx_fast"]["batch_16"] == {"tokens_per_s": 75, "runs": [70, 80]}
    assert out["fast_over_torch"]["batch_16"] == pytest.approx(75 / 70)
    assert out["torch"]["torch"] == "2.13.0" and "model" not in out["torch"]


def make_report(train=None, generate=None, notes=()):
    entry = {"ceiling_tokens_per_s": 100.0, "flops_per_token": FLOPS,
             "train": train or {"plain": summarize_train(runs(), ceiling(), "m plain", [])}}
    if generate:
        entry["generate"] = generate
    report = {"machine": {"cpus": 2},
              "settings": {"batch": 4, "seq_len": 256, "steps": 5, "warmup": 2, "repeats": 2},
              "ceiling": {"matmul_gflops": 100.0, "best_probe": "start",
                          "probes": [{"where": "start", "gflops": 100.0}]},
              "models": {"smollm2-135m": entry}, "notes": list(notes)}
    report["targets"] = targets(report)
    return report


def test_report_tables_and_targets(capsys):
    gen = summarize_generate({fw: [{"batch_1": {"tokens_per_s": t}, "batch_16": {"tokens_per_s": 8 * t}}]
                              for fw, t in (("mlx_stock", 8), ("mlx_fast", 11), ("torch", 10))}, "m")
    report = make_report(generate=gen)
    json.dumps(report)  # the report is JSON as it is
    met = {t["target"]: (t["mode"], t["met"]) for t in report["targets"]}
    # fast 65 tok/s (60, 70) against torch 75 (50, 100): 0.95x, the median of 1.2 and 0.7
    assert met == {"training tokens/s, MLX fast >= PyTorch+PEFT": ("plain", False),
                   "share of the ceiling, MLX fast >= PyTorch+PEFT": ("plain", False),
                   "generation tokens/s at batch 16, MLX fast >= PyTorch": ("batch_16", True)}
    print_report(report)
    printed = capsys.readouterr().out
    for column in ("stock", "fast", "torch", "fast/torch", "eff stock", "eff fast", "eff torch"):
        assert column in printed
    assert "65.0%" in printed and "75.0%" in printed and "0.95" in printed
    assert "MISSED training tokens/s" in printed and "met    generation tokens/s at batch 16" in printed


def test_kernel_rows_pair_builtin_and_fast(stub_fastpath):
    cases = kernels(stub_fastpath, batch=1, seq=8, heads=2, head_dim=4, hidden=8, ffn=16, vocab=32,
                    vocab_rows=8)
    assert {"exp", "softmax, rows of 8", "softmax, rows of 32", "cross-entropy (loss)", "sigmoid", "SiLU",
            "SwiGLU (MLP)", "attention, causal", "dropout mask p=0.1"} <= set(cases)
    def boom(x):
        raise ValueError("broken kernel")
    broken = cases["SiLU"]._replace(fast=boom)
    rows = {r["op"]: r for r in time_kernels({**cases, "SiLU": broken}, repeats=1)}
    assert set(rows["exp"]["forward"]) == {"builtin", "fast"} == set(rows["exp"]["forward_backward"])
    assert rows["exp"]["max_abs_diff"] == 0  # the stub is MLX's own
    assert set(rows["attention, causal"]["forward_backward"]) == {"builtin", "fast"}
    assert "forward_backward" not in rows["dropout mask p=0.1"]
    assert set(rows["RMSNorm"]["forward"]) == {"builtin"}  # no fast version: for the profile
    assert rows["SiLU"]["error"].startswith("ValueError")  # a broken kernel is a row, not a crash


def test_profile_table_accounts_for_the_measured_step():
    profile = {"batch": 4, "seq_len": 256, "fastpath_swapped": ["SwiGLU (MLP)"],
               "measured": {"step": {"stock": 10.0, "fast": 8.0}},
               "ops": [{"op": "SwiGLU (MLP)", "count": 30, "timed": "forward_backward",
                        "builtin_s": 0.05, "fast_s": 0.01},
                       {"op": "attention, causal", "count": 30, "timed": "forward_backward",
                        "builtin_s": 0.04, "fast_s": 0.03},
                       {"op": "RMSNorm", "count": 61, "timed": "forward_backward",
                        "builtin_s": 0.001, "fast_s": None}]}
    rows = {r["op"]: r for r in profile_table(profile, FLOPS, 1024.0)["rows"]}
    assert rows["matmuls at the ceiling's rate"]["stock_s"] == pytest.approx(1.0)  # 1024 tokens
    assert rows["SwiGLU (MLP)"]["fast_s"] == pytest.approx(0.3) and rows["SwiGLU (MLP)"]["swapped_in"]
    # attention has a fast kernel, but enable() does not swap it in: the step uses MLX's
    assert rows["attention, causal"]["fast_s"] == pytest.approx(1.2)
    assert rows["attention, causal"]["fast_available_s"] == pytest.approx(0.9)
    for key, step in (("stock_s", 10.0), ("fast_s", 8.0)):
        assert sum(r[key] for r in rows.values()) == pytest.approx(step)


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


def test_quantized_steps_times_every_configuration_on_one_batch(tiny_model_dir, tiny_data_dir, capsys):
    from voicetune.bench import quantized_steps
    from voicetune.core import kernels as fp

    try:
        quantized_steps.main(["--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
                              "--rounds", "1", "--stock"])
    finally:
        fp.SWAP_QUANTIZED_MATMUL = True
        fp.disable()
    out = capsys.readouterr().out
    rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()
            if line.endswith("x")}
    assert list(rows) == ["float32", "8-bit", "4-bit", "8-bit, MLX's quantized matmul",
                          "4-bit, MLX's quantized matmul"]
    assert rows["float32"][1] == "1.00x" and all(float(r[0]) > 0 for r in rows.values())
