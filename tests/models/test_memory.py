import json

import pytest

from voicetune.models.memory import (EstimateError, base_parameter_count, lora_parameter_count,
                                memory_estimate, report, report_before_training)

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
    assert small["logits_gb"] == pytest.approx(2 * 4 * 512 * 32064 * 4 / 1e9)
    # seq_len defaults to, and is capped at, train.max_seq_length
    assert memory_estimate(PHI3_MINI, LORA, TRAIN, 2)["tokens"] == 4 * 2048
    assert memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=10**6)["seq_len"] == 2048
    # only the adapted blocks keep activations
    last8 = memory_estimate(PHI3_MINI, {**LORA, "num_layers": 8}, TRAIN, 2, seq_len=512)
    assert last8["activations_gb"] == pytest.approx(small["activations_gb"] / 4)


def test_report_warns_loudly_when_memory_is_short(capsys):
    est = memory_estimate(PHI3_MINI, LORA, TRAIN, 2, seq_len=512)
    assert report(est, physical_gb=1000.0)
    out, err = capsys.readouterr()
    assert "total ~" in out and "1000.0 GB" in out and err == ""
    assert not report(est, physical_gb=4.0)
    out, err = capsys.readouterr()
    assert "WARNING" in err and "grad_checkpoint" in err


def test_report_before_training_flags_a_count_mismatch(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI))
    report_before_training(tmp_path, LORA, TRAIN, 9_437_184, seq_len=256)
    out, err = capsys.readouterr()
    assert "9,437,184 (matches)" in out and "(2-byte weights" in out  # no torch_dtype: 2
    report_before_training(tmp_path, LORA, TRAIN, 3_145_728, seq_len=256, dtype_bytes=4)
    out, err = capsys.readouterr()
    assert "WARNING" in err and "(4-byte weights" in out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    report_before_training(tmp_path, LORA, TRAIN, 1)  # unsupported: a note, no crash
    assert "no estimate" in capsys.readouterr().out
