"""Which linear layers get LoRA adapters, checked against the model that is really there.

mlx-lm's ``linear_to_lora_layers`` silently ignores keys that match nothing (Phi-3 has one
fused ``self_attn.qkv_proj``, so ``q_proj/k_proj/v_proj`` adapt nothing); we refuse them.
"""
from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from voicetune.core.errors import UserError

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


class LoRAConfigError(UserError, ValueError):
    pass


def layers_to_adapt(model, num_layers: int | None) -> int:
    total = len(model.layers)
    if num_layers is None or num_layers == -1:
        return total
    if not 1 <= num_layers <= total:
        raise LoRAConfigError(f"lora.num_layers={num_layers}, but the model has {total} layers "
                              "(use -1 for all of them)")
    return num_layers


def linear_module_names(model, num_layers: int) -> list[str]:
    """Names (relative to a transformer block, e.g. ``self_attn.o_proj``) of the linear
    modules in the last ``num_layers`` blocks."""
    names = set()
    for layer in model.layers[len(model.layers) - num_layers:]:
        names.update(name for name, module in layer.named_modules()
                     if name and isinstance(module, LINEAR_TYPES))
    return sorted(names)


def check_keys(model, keys: list[str], num_layers: int) -> None:
    if not keys:
        raise LoRAConfigError("lora.keys is empty: list the linear modules to adapt")
    available = linear_module_names(model, num_layers)
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise LoRAConfigError(
            f"lora.keys {unknown} match no linear module of this model, so they would "
            f"silently train nothing. The model's linear modules are: {', '.join(available)}"
        )


def apply_lora(model, rank: int, scale: float, dropout: float, keys: list[str],
               num_layers: int | None) -> dict:
    """Freeze the model, add LoRA to ``keys`` in the last ``num_layers`` blocks, and return
    the adapter config in mlx-lm's own format (so ``mlx_lm.generate --adapter-path`` works)."""
    n = layers_to_adapt(model, num_layers)
    check_keys(model, keys, n)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys)}
    linear_to_lora_layers(model, n, params)
    return {"fine_tune_type": "lora", "num_layers": n, "lora_parameters": params}


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; total counts the base weights once, a quantized
    layer's as the weights it packs (not its packed integers, scales and biases)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, module in model.named_modules():
        if hasattr(module, "bits") and "scales" in module:  # QuantizedLinear, QuantizedEmbedding
            packed = module.weight.size + module.scales.size + \
                (module.biases.size if module.get("biases") is not None else 0)
            total += module.weight.size * 32 // module.bits - packed
    return trainable, total
