"""Small random-weight models with a real tokenizer, for tests and benchmarks.

``make_random_model`` writes an HF-format folder (config.json, model.safetensors, and the
tokenizer files of an existing model folder) that mlx-lm loads like any other model: the
same architecture code paths as the real model, at a size that trains in milliseconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from .base_model import write_generation_config
from .files import write_json_atomic
from .gguf_convert import write_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def make_random_model(tokenizer_dir: str | Path, out: str | Path, seed: int = 0,
                      **overrides) -> Path:
    """Copy ``tokenizer_dir``'s config and tokenizer, shrink the config with ``overrides``
    (hidden_size=64, num_hidden_layers=2, ...), and save random float32 weights."""
    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((tokenizer_dir / "config.json").read_text())
    config.update(overrides)
    if "hidden_size" in overrides and "head_dim" in config and "head_dim" not in overrides:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    _save_random_weights(config, out, seed)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def _save_random_weights(config: dict, out: Path, seed: int) -> None:
    """Write config.json and model.safetensors: mlx-lm's own initialization, in float32."""
    config["torch_dtype"] = "float32"
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    write_json_atomic(out / "config.json", config)


# microsoft/Phi-3-mini-4k-instruct's config.json (the values mlx-lm's phi3 model reads).
PHI3_MINI_4K_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}


def make_random_phi3(out: str | Path, vocab_gguf: str | Path, seed: int = 0, **overrides) -> Path:
    """A random-weight Phi-3 (mlx-lm's ``phi3``: fused qkv_proj and gate_up_proj) with the
    real tokenizer rebuilt from ``vocab_gguf`` (see voicetune.phi3_vocab), Phi-3-mini's config
    shrunk by ``overrides``, and its end-of-turn ``<|end|>`` as a stop token."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**PHI3_MINI_4K_CONFIG, **overrides}
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        config["num_key_value_heads"] = config["num_attention_heads"]  # Phi-3-mini has no GQA
    tok = write_tokenizer(gguf.GGUFReader(str(vocab_gguf)), out)
    if tok.get_vocab_size() != config["vocab_size"]:
        raise ValueError(f"{vocab_gguf} has {tok.get_vocab_size()} tokens, but vocab_size is "
                         f"{config['vocab_size']}: not a Phi-3 vocabulary")
    _save_random_weights(config, out, seed)
    write_generation_config(out, [tok.token_to_id("<|end|>")])
    return out
