import json
import re

import pytest

from voicetune.models import memory
from voicetune.models.memory import (EstimateError, MemoryPlanError, base_parameter_count,
                                     check_before_training, lora_parameter_count, mac_usable_gb,
                                     memory_estimate, plan, report, weights_bytes)

PHI3_MINI = {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192,
             "vocab_size": 32064, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
LORA = {"rank": 16, "keys": ["self_attn.qkv_proj", "self_attn.o_proj"], "num_layers": -1}
TRAIN = {"batch_size": 4, "max_seq_length": 2048, "grad_checkpoint": False}


def test_phi3_mini_counts():
    assert lora_parameter_count(PHI3_MINI, LORA["keys"], 16, 32) == 9_437_184
    assert lora_parameter_count(PHI3_MINI, ["self_attn.o_proj"], 16, -1) == 3_145_728
    assert base_parameter_count(PHI3_MINI) == 3_821_079_552  # the published 3.8B


def test_unknown_keys_and_models_are_refused():
    with pytest.raises(EstimateError, match=r"self_attn.q_proj.*qkv_proj"):
        lora_parameter_count(PHI3_MINI, ["self_attn.q_proj"], 16, -1)
    with pytest.raises(EstimateError, match="num_layers=33"):
        lora_parameter_count(PHI3_MINI, ["self_attn.o_proj"], 16, 33)
    with pytest.raises(EstimateError, match="gpt2"):
        lora_parameter_count({"model_type": "gpt2"}, ["c_attn"], 16, -1)


def _tiny(config: dict):
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    return model_class(args_class.from_dict(config))


TINY = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "intermediate_size": 96, "vocab_size": 128, "rms_norm_eps": 1e-5}
CASES = [  # (config, keys, num_layers): GQA, head_dim override, biases, tied or not
    ({**TINY, "model_type": "llama", "num_key_value_heads": 2},
     ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"], -1),
    ({**TINY, "model_type": "llama", "num_key_value_heads": 1, "head_dim": 24,
      "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
     ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], 2),
    ({**TINY, "model_type": "phi3", "num_key_value_heads": 2},
     ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"], -1),
    ({**TINY, "model_type": "phi3", "num_key_value_heads": 4, "tie_word_embeddings": True},
     ["self_attn.o_proj"], 1),
]


@pytest.mark.parametrize("config,keys,num_layers", CASES)
def test_formulas_match_real_models(config, keys, num_layers):
    from voicetune.models.lora import apply_lora, parameter_counts

    model = _tiny(config)
    apply_lora(model, rank=4, scale=20.0, dropout=0.0, keys=keys, num_layers=num_layers)
    trainable, total = parameter_counts(model)
    assert trainable == lora_parameter_count(config, keys, 4, num_layers)
    assert total - trainable == base_parameter_count(config)


def test_memory_grows_with_batch_and_checkpointing_saves_activations():
    small = memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=512)
    big = memory_estimate(PHI3_MINI, LORA, {**TRAIN, "batch_size": 8}, 2, seq_len=512)
    ckpt = memory_estimate(PHI3_MINI, LORA, {**TRAIN, "grad_checkpoint": True}, 2, seq_len=512)
    assert big["total_gb"] > small["total_gb"] and big["activations_gb"] > small["activations_gb"]
    assert ckpt["activations_gb"] < small["activations_gb"] / 5
    assert ckpt["total_gb"] < small["total_gb"]
    assert small["weights_gb"] == pytest.approx(3_821_079_552 * 2 / 1e9)
    assert small["optimizer_gb"] == pytest.approx(2 * 9_437_184 * 4 / 1e9)
    # every position trained (no targets given): logits, softmax and gradient in float32
    assert small["logits_gb"] == pytest.approx(3 * 4 * 512 * 32064 * 4 / 1e9)
    # only the trained (answer) positions go through the vocabulary projection
    answers = memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=512, targets=300)
    assert answers["logits_gb"] == pytest.approx(3 * 300 * 32064 * 4 / 1e9)
    assert small["total_gb"] - answers["total_gb"] == pytest.approx(
        small["logits_gb"] - answers["logits_gb"])
    # seq_len defaults to, and is capped at, train.max_seq_length
    assert memory_estimate(PHI3_MINI, LORA, TRAIN, 2)["tokens"] == 4 * 2048
    assert memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=10**6)["seq_len"] == 2048
    # only the adapted blocks keep activations
    last8 = memory_estimate(PHI3_MINI, {**LORA, "num_layers": 8}, TRAIN, 2, seq_len=512)
    assert last8["activations_gb"] == pytest.approx(small["activations_gb"] / 4)


def test_report_says_whether_it_fits(capsys):
    est = memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=512)
    assert report(est, usable_gb=1000.0, source="test memory")
    out, _ = capsys.readouterr()
    assert "total ~" in out and "1000.0 GB (test memory)" in out
    assert not report(est, usable_gb=4.0)
    assert "of 4.0 GB" in capsys.readouterr().out


def test_check_before_training_flags_a_count_mismatch(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI))
    roomy = (1000.0, "test")
    check_before_training(tmp_path, LORA, TRAIN, 9_437_184, seq_len=256, usable=roomy)
    out, err = capsys.readouterr()
    assert "9,437,184 (matches)" in out and "(2-byte weights" in out  # no torch_dtype: 2
    check_before_training(tmp_path, LORA, TRAIN, 3_145_728, seq_len=256, dtype_bytes=4,
                          usable=roomy)
    out, err = capsys.readouterr()
    assert "WARNING" in err and "(4-byte weights" in out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert check_before_training(tmp_path, LORA, TRAIN, 1, usable=roomy) is None  # a note
    assert "no estimate" in capsys.readouterr().out


# ------------------------------------------------------------------ quantized weights
NORMS = 32 * 2 * 3072 + 3072  # Phi-3-mini's RMSNorm weights: the only parameters left float


@pytest.mark.parametrize("bits,dtype_bytes", [(4, 2), (8, 2), (4, 4), (8, 4)])
def test_quantization_lowers_the_weights_by_the_expected_ratio(bits, dtype_bytes):
    base = 3_821_079_552
    plain = memory_estimate(PHI3_MINI, LORA, TRAIN, dtype_bytes, seq_len=512, quantize=None)
    quant = memory_estimate(PHI3_MINI, LORA, TRAIN, dtype_bytes, seq_len=512, quantize=bits)
    # every Phi-3-mini linear and the embeddings have a last dimension divisible by 64: packed
    # weights plus a scale and a bias per 64 in the float dtype; the norms stay float
    per_weight = bits / 8 + 2 * dtype_bytes / 64
    expected = ((base - NORMS) * per_weight + NORMS * dtype_bytes) / (base * dtype_bytes)
    assert quant["weights_gb"] / plain["weights_gb"] == pytest.approx(expected, rel=1e-9)
    assert plain["weights_gb"] == pytest.approx(base * dtype_bytes / 1e9)
    # the rest of the estimate is the same; only the weights term moves
    assert quant["total_gb"] - quant["weights_gb"] == pytest.approx(
        plain["total_gb"] - plain["weights_gb"])
    # a quantized folder's config.json says the same as a planned quantize
    folder = {**PHI3_MINI, "quantization": {"group_size": 64, "bits": bits}}
    assert memory_estimate(folder, LORA, TRAIN, dtype_bytes, seq_len=512)["weights_gb"] == \
        pytest.approx(quant["weights_gb"])


def test_the_cpu_fast_paths_dequantized_copies_are_counted_for_a_quantized_base_only():
    """On an x86 CPU the quantized layers multiply through BLAS, and MLX holds every layer's
    dequantized weight until its product: a float copy of every quantized weight."""
    base = 3_821_079_552
    quant = memory_estimate(PHI3_MINI, LORA, TRAIN, 4, seq_len=512, quantize=4)
    on_cpu = memory_estimate(PHI3_MINI, LORA, TRAIN, 4, seq_len=512, quantize=4, dequantized=True)
    assert on_cpu["dequantized_gb"] == pytest.approx((base - NORMS) * 4 / 1e9)
    assert on_cpu["total_gb"] - quant["total_gb"] == pytest.approx(on_cpu["dequantized_gb"])
    plain = memory_estimate(PHI3_MINI, LORA, TRAIN, 4, seq_len=512, quantize=None, dequantized=True)
    assert plain["dequantized_gb"] == 0.0  # a float base has no dequantized copies
    rows = memory.plan(PHI3_MINI, LORA, TRAIN, 1e3, 4, seq_len=512, quantize=None, dequantized=True)
    q4 = next(r for r in rows if r["quantize"] == 4 and not r["changes"].keys() - {"model.quantize"})
    assert q4["total_gb"] == pytest.approx(on_cpu["total_gb"])  # the plan counts them too


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_quantized_weights_match_an_mlx_lm_quantized_model(bits, group_size):
    """The bytes of a model quantized by mlx-lm (float32 scales, as on a CPU), including a
    down_proj whose input (96) is not a multiple of 64: left in float32."""
    from mlx.utils import tree_flatten
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    config = {**TINY, "model_type": "llama", "num_key_value_heads": 2}
    model = _tiny(config)
    model.set_dtype(mx.float32)
    model, quantized_config = quantize_model(model, config, group_size, bits)
    real = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert weights_bytes(config, 4, quantize=bits, group_size=group_size) == real
    assert weights_bytes(quantized_config, 4) == real  # from config.json's "quantization"
    assert real < weights_bytes(config, 4, quantize=None) / 2  # and it did shrink


# ------------------------------------------------------------------ usable memory and the plan
def test_usable_memory_rule_for_macs():
    # Metal's recommendedMaxWorkingSetSize: 2/3 of RAM up to 32 GiB (16 GiB -> 10922.67 MiB),
    # 3/4 above (64 GiB -> 51539.61 MB, both as llama.cpp's Metal logs print them)
    assert mac_usable_gb(16) * 1e9 / 2**20 == pytest.approx(10922.67, abs=0.01)
    assert mac_usable_gb(64) * 1e3 == pytest.approx(51539.61, abs=0.01)
    assert mac_usable_gb(8) == pytest.approx(5.727, abs=1e-3)
    assert mac_usable_gb(32) == pytest.approx(32 * 2**30 * 2 / 3 / 1e9)


def test_usable_memory_here(monkeypatch):
    import mlx.core as mx

    if not mx.metal.is_available():
        assert memory.usable_memory_gb() == (memory.physical_memory_gb(), "physical memory")
    info = {"memory_size": 16 * 2**30, "max_recommended_working_set_size": 11453246122}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: info, raising=False)
    gb, source = memory.usable_memory_gb()
    assert gb == pytest.approx(11.453246122) and "Metal" in source and "17.2 GB" in source


def _apply(changes: dict, config: dict, train: dict):
    """params changes as the plan names them -> (quantize, train)."""
    quantize, train = None, dict(train)
    for key, value in changes.items():
        if key == "model.quantize":
            quantize = value
        else:
            train[key.removeprefix("train.")] = value
    return quantize, train


def test_a_run_that_cannot_fit_is_refused_naming_settings_that_do_fit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI))
    train = {**TRAIN, "grad_checkpoint": False}
    full = memory_estimate(PHI3_MINI, LORA, train, 2, seq_len=512)
    usable = full["total_gb"] * 0.7  # checkpointing saves far more than 30% here
    with pytest.raises(MemoryPlanError) as err:
        check_before_training(tmp_path, LORA, train, 9_437_184, seq_len=512, dtype_bytes=2,
                              usable=(usable, "a test machine"))
    text = str(err.value)
    assert f"{full['total_gb']:.1f} GB" in text and f"{usable:.1f} GB" in text
    assert "a test machine" in text
    fixes = re.findall(r"set (.+?) \(est\. ([\d.]+) GB\)", text)
    assert fixes and fixes[0][0] == "train.grad_checkpoint: true"  # the cheapest change first
    for described, est_gb in fixes:  # each suggested fix really fits, by the same estimate
        changes = {k: yaml_value(v) for k, v in (p.split(": ") for p in described.split(" and "))}
        quantize, fixed = _apply(changes, PHI3_MINI, train)
        got = memory_estimate(PHI3_MINI, LORA, fixed, 2, seq_len=512, quantize=quantize)
        assert got["total_gb"] <= usable and f"{got['total_gb']:.1f}" == est_gb
    # the same run with room to spare passes, and returns its estimate
    est = check_before_training(tmp_path, LORA, train, 9_437_184, seq_len=512, dtype_bytes=2,
                                usable=(full["total_gb"] * 1.01, "a bigger machine"))
    assert est["total_gb"] == pytest.approx(full["total_gb"])


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def test_the_plan_reaches_for_quantization_and_smaller_batches_when_checkpointing_is_not_enough():
    train = {**TRAIN, "grad_checkpoint": True}
    ckpt = memory_estimate(PHI3_MINI, LORA, train, 2, seq_len=512)
    q4 = memory_estimate(PHI3_MINI, LORA, train, 2, seq_len=512, quantize=4)
    usable = (ckpt["total_gb"] + q4["total_gb"]) / 2  # only quantizing (or more) can fit
    rows = plan(PHI3_MINI, LORA, train, usable, 2, seq_len=512)
    fixes = memory.cheapest_fixes(rows)
    assert [r["changes"] for r in fixes][:1] in ([{"model.quantize": 8}], [{"model.quantize": 4}])
    assert all(r["fits"] and r["total_gb"] <= usable for r in fixes)
    assert not any(r["fits"] for r in rows if not r["changes"])  # as configured: no fit
    # on a machine where nothing fits, the refusal says so
    tiny = memory.refusal(ckpt, plan(PHI3_MINI, LORA, train, 0.1, 2, 512), 0.1, "a tiny machine")
    assert "No setting" in tiny and "To fit" not in tiny


def test_check_before_training_honours_train_memory_limit_gb(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI))
    est = memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=256)
    monkeypatch.setattr(memory, "usable_memory_gb", lambda: (1e6, "a huge machine"))
    # null: this machine's usable memory
    check_before_training(tmp_path, LORA, {**TRAIN, "memory_limit_gb": None}, 9_437_184, 256)
    with pytest.raises(MemoryPlanError, match=r"train\.memory_limit_gb"):
        check_before_training(tmp_path, LORA, {**TRAIN, "memory_limit_gb": est["total_gb"] - 0.1},
                              9_437_184, 256)
    check_before_training(tmp_path, LORA, {**TRAIN, "memory_limit_gb": est["total_gb"] + 0.1},
                          9_437_184, 256)
    monkeypatch.setattr(memory, "usable_memory_gb", lambda: (1.0, "a small machine"))
    with pytest.raises(MemoryPlanError, match="a small machine"):
        check_before_training(tmp_path, LORA, {**TRAIN, "memory_limit_gb": None}, 9_437_184, 256)
    check_before_training(tmp_path, LORA, {**TRAIN, "memory_limit_gb": 1000.0}, 9_437_184, 256)


def test_train_stage_refuses_before_training(tmp_path, tiny_model_dir, tiny_data_dir):
    from tests.harness.training import run_train, train_params

    folder, done = run_train(tmp_path, tiny_model_dir, tiny_data_dir,
                             train_params(memory_limit_gb=0.001))
    assert done.returncode == 1, done.stderr
    assert "train: training needs an estimated" in done.stderr
    assert "0.0 GB it may use (train.memory_limit_gb)" in done.stderr
    assert "Traceback" not in done.stderr
    assert "memory estimate for batches of 2 x" in done.stdout  # printed, then refused
    for output in ("adapters", "train.json", "live", "checkpoint"):  # before any step
        assert not (folder / output).exists(), output


def test_batch_shape_is_the_widest_batch_and_the_most_trained_tokens():
    samples = [(10, 4), (300, 100), (50, 10), (40, 39), (290, 10)]
    # sorted by length: [10, 40, 50, 290, 300] -> batches [10, 40], [50, 290], [300]; the
    # widest input is 300 padded to a multiple of 32 (collate's width, less the shifted token)
    assert memory.batch_shape(samples, 2, 2048) == {"width": 320, "targets": (50 - 10) + (290 - 10)}
    assert memory.batch_shape(samples, 2, 257)["width"] == 256
    assert memory.batch_shape([], 2, 256) == {"width": None, "targets": None}
