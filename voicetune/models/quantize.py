"""Quantized base models (QLoRA): the base weights in 4 or 8 bits, the adapters in float.

A base is quantized either at its source (an MLX 4/8-bit folder or hub repo, such as the
``mlx-community/*-4bit`` repos) or by the base_model stage (``model.quantize: 4 | 8`` with
``model.quantize_group_size``), with mlx-lm's own ``quantize_model``: every linear and
embedding layer whose rows split into whole groups is stored as packed integers plus a
float scale and bias per group, and config.json's ``quantization`` says how. mlx-lm loads
such a folder as it is; its LoRA layers wrap the quantized linear layers, so training updates
only the float adapters (QLoRA, Dettmers et al. 2023).

What a fuse makes of a quantized base (voicetune/models/fusion.py): the adapters are added to
the DEQUANTIZED weights and the whole model is saved dequantized (mlx-lm's ``--dequantize``),
in the dtype of the scales. Re-quantizing instead would round every fused weight back to the
4-bit grid, where an adapter's small update is partly or wholly lost: the fused model would no
longer be the model that was evaluated.
"""
from __future__ import annotations

import json
from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.core.files import write_json_atomic

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


class QuantizeError(UserError, ValueError):
    pass


def quantization_of(config: dict) -> dict | None:
    """``{"bits", "group_size"}`` of an mlx-lm quantized config (its model-wide setting), or
    None for a float model."""
    q = config.get("quantization")
    if not isinstance(q, dict):
        return None
    return {"bits": q.get("bits"), "group_size": q.get("group_size"),
            **({"mode": q["mode"]} if q.get("mode", "affine") != "affine" else {})}


def folder_quantization(folder: str | Path) -> dict | None:
    return quantization_of(json.loads((Path(folder) / "config.json").read_text()))


def describe(q: dict | None) -> str:
    """'4-bit (group size 64)' or 'float' (for the card and the stages' messages)."""
    if not q:
        return "float"
    mode = f", {q['mode']}" if q.get("mode") else ""
    return f"{q['bits']}-bit (group size {q['group_size']}{mode})"


def check_request(existing: dict | None, bits: int | None, group_size: int) -> bool:
    """Whether the base_model stage has to quantize: True for a float source with
    ``model.quantize`` set. A source that is already quantized is taken as it is when
    ``model.quantize`` is null or says the same; re-quantizing it is refused (the float
    weights are gone: rounding them again only adds error)."""
    if bits is None:
        return False
    if existing is None:
        return True
    if existing.get("bits") == bits and existing.get("group_size") == group_size:
        return False
    raise QuantizeError(
        f"model.quantize: {bits} (group size {group_size}), but model.source is already "
        f"quantized: {describe(existing)}. Set model.quantize: null to train on it as it is"
        f" (or model.quantize: {existing.get('bits')} with model.quantize_group_size: "
        f"{existing.get('group_size')}), or point model.source at the float model to quantize")


def quantize_folder(folder: str | Path, bits: int, group_size: int) -> dict:
    """Quantize the float model in ``folder`` in place with mlx-lm (weights and config.json;
    the tokenizer files stay); return the config's quantization."""
    import mlx.core as mx
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    folder = Path(folder)
    model, _, config = load(str(folder), return_config=True, lazy=False)
    mx.eval(model.parameters())  # read every float weight before their files go
    model, config = quantize_model(model, config, group_size, bits)
    for old in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        old.unlink()
    save_model(folder, model, donate_model=True)
    save_config(config, config_path=folder / "config.json")
    return quantization_of(config)


def record(folder: str | Path, quantized_here: bool) -> dict | None:
    """Add the base's quantization to its source.json (for the card and the stages): what it
    is, and whether the base_model stage made it or the source came that way."""
    folder = Path(folder)
    q = folder_quantization(folder)
    path = folder / "source.json"
    source = json.loads(path.read_text())
    source["quantization"] = q and {**q, "by": "voicetune" if quantized_here else "source"}
    write_json_atomic(path, source)
    return source["quantization"]
