"""Small random-weight models with a real tokenizer, for tests and benchmarks.

``make_random_model`` writes an HF-format folder (config.json, model.safetensors, and the
tokenizer files of an existing model folder) that mlx-lm loads like any other model: the
same architecture code paths as the real model, at a size that trains in milliseconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from .files import write_json_atomic

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
    config["torch_dtype"] = "float32"
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    write_json_atomic(out / "config.json", config)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return out
