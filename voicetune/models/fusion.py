"""Fusing LoRA adapters into the base weights (mlx-lm's own fuse), and proving it worked.

A fused model must behave like base + adapters applied at run time (same logits within a
float tolerance, same greedy answers) and must differ from the base model: a fuse that
silently dropped the adapters (a known failure mode) is caught here, not in the report.
"""
from __future__ import annotations

import gc
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, load, save

from voicetune.core.errors import UserError
from voicetune.models.generation import generate_batched
from voicetune.models.quantize import quantization_of


class FusionError(UserError, RuntimeError):
    pass


def load_float32(path, adapter_path=None):
    model, tokenizer, config = load(str(path), adapter_path=adapter_path and str(adapter_path),
                                    return_config=True)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # compare like with like; the CPU backend is slow in bf16
    model.eval()
    return model, tokenizer, config


def fuse(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict | None:
    """mlx-lm's fuse: LoRA layers -> plain linear layers, saved as an HF-format folder.

    A quantized base (QLoRA) is fused DEQUANTIZED, as ``mlx_lm.fuse --dequantize`` does: each
    adapted layer becomes dequantize(W) + the adapter's update, every other quantized layer
    dequantize(W), in the scales' dtype; config.json loses its ``quantization``. That is the
    model base+adapters computes, so the equivalence check holds at float tolerance;
    re-quantizing (mlx-lm's default) would round the updates back onto the quantized grid and
    lose them in part or whole (see voicetune/models/quantize.py). Returns the base's
    quantization (None for a float base)."""
    model, tokenizer, config = load(str(base_dir), adapter_path=str(adapter_dir), return_config=True)
    quantization = quantization_of(config)
    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if not fused:
        raise FusionError(f"{adapter_dir} applied no LoRA layer to {base_dir}: nothing to fuse")
    model.update_modules(tree_unflatten(fused))
    if quantization:
        model = dequantize_model(model)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    save(out_dir, base_dir, model, tokenizer, config, donate_model=False)
    # mlx-lm's save keeps only generation_config.json; the chat template comes with the tokenizer
    return quantization


def last_logits(model, prompts: list[list[int]]) -> list[np.ndarray]:
    """Logits over every prompt position, one prompt at a time (no padding involved)."""
    out = []
    for prompt in prompts:
        logits = model(mx.array(prompt)[None])[0].astype(mx.float32)
        mx.eval(logits)
        out.append(np.array(logits))
    return out


def verify(base_dir: Path, adapter_dir: Path, fused_dir: Path, prompts: list[list[int]],
           tolerance: float, max_tokens: int) -> dict:
    """Compare fused vs runtime adapters vs base on ``prompts``; models loaded one at a time."""
    results = {}
    for name, path, adapters in (("lora", base_dir, adapter_dir), ("fused", fused_dir, None),
                                 ("base", base_dir, None)):
        model, tokenizer, _ = load_float32(path, adapters)
        answers = generate_batched(model, tokenizer, prompts, max_tokens) if name != "base" else None
        results[name] = (last_logits(model, prompts), answers)
        del model
        gc.collect()
    lora_logits, lora_answers = results["lora"]
    fused_logits, fused_answers = results["fused"]
    base_logits, _ = results["base"]
    fused_vs_lora = max(float(np.abs(f - l).max()) for f, l in zip(fused_logits, lora_logits))
    fused_vs_base = max(float(np.abs(f - b).max()) for f, b in zip(fused_logits, base_logits))
    lora_vs_base = max(float(np.abs(l - b).max()) for l, b in zip(lora_logits, base_logits))
    same_answers = sum(f["prediction"] == l["prediction"] for f, l in zip(fused_answers, lora_answers))
    report = {
        "prompts": len(prompts),
        "tolerance": tolerance,
        "max_abs_logit_diff_fused_vs_lora": fused_vs_lora,
        "max_abs_logit_diff_fused_vs_base": fused_vs_base,
        "max_abs_logit_diff_lora_vs_base": lora_vs_base,
        "greedy_answers_identical": same_answers,
        "greedy_max_tokens": max_tokens,
    }
    problems = []
    if fused_vs_lora > tolerance:
        problems.append(f"fused logits differ from base+adapters by {fused_vs_lora:.2e} "
                        f"(> fuse.logit_tolerance {tolerance:.0e})")
    if same_answers != len(prompts):
        problems.append(f"only {same_answers}/{len(prompts)} greedy answers of the fused model "
                        "match base+adapters")
    if lora_vs_base <= tolerance:
        problems.append(f"the adapters change nothing (base+adapters vs base: {lora_vs_base:.2e}); "
                        "was the best checkpoint iteration 0? see metrics/train.json")
    elif fused_vs_base <= tolerance:
        problems.append(f"the fused model equals the base model (max logit difference "
                        f"{fused_vs_base:.2e}): the adapters were not fused in")
    report["ok"] = not problems
    report["problems"] = problems
    return report
