"""Before training: the expected trainable-parameter count and a memory estimate, computed from
the model's config.json alone (no weights loaded), so that a run that cannot fit is flagged
before it swaps for an hour, and a LoRA that adapts the wrong modules shows up as a count.

Supports the layouts of mlx-lm's ``llama`` (also used for ``mistral``) and ``phi3`` models.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from voicetune.core.errors import UserError

GB = 1e9  # decimal, like peak_memory_gb in metrics/train.json
LLAMA_TYPES, PHI3_TYPES = ("llama", "mistral"), ("phi3",)


class EstimateError(UserError, ValueError):
    pass


def _dims(config: dict) -> dict:
    model_type = config.get("model_type")
    if model_type not in LLAMA_TYPES + PHI3_TYPES:
        raise EstimateError(f"no estimate for model_type {model_type!r} "
                            f"(supported: {', '.join(LLAMA_TYPES + PHI3_TYPES)})")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return {
        "phi3": model_type in PHI3_TYPES,
        "hidden": hidden,
        "layers": config["num_hidden_layers"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        # mlx-lm's phi3 ignores config.head_dim; llama honours it (e.g. SmolLM3, Llama 3.2)
        "head_dim": (None if model_type in PHI3_TYPES else config.get("head_dim"))
        or hidden // heads,
        "intermediate": config["intermediate_size"],
        "vocab": config["vocab_size"],
        "tied": config.get("tie_word_embeddings", model_type in LLAMA_TYPES),
    }


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear module in a transformer block, by its LoRA key."""
    d = _dims(config)
    h, q, kv, inter = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], \
        d["intermediate"]
    if d["phi3"]:
        return {"self_attn.qkv_proj": (h, q + 2 * kv), "self_attn.o_proj": (q, h),
                "mlp.gate_up_proj": (h, 2 * inter), "mlp.down_proj": (inter, h)}
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
            "mlp.down_proj": (inter, h)}


def _adapted_layers(config: dict, num_layers: int | None) -> int:
    total = config["num_hidden_layers"]
    if num_layers is None or num_layers == -1:
        return total
    if not 1 <= num_layers <= total:
        raise EstimateError(f"lora.num_layers={num_layers}, but the model has {total} layers")
    return num_layers


def lora_parameter_count(config: dict, keys, rank: int, num_layers: int | None) -> int:
    """LoRA on a d_in -> d_out linear adds A (d_in x rank) and B (rank x d_out)."""
    shapes = linear_shapes(config)
    unknown = [k for k in keys if k not in shapes]
    if unknown:
        raise EstimateError(f"lora.keys {unknown} are not linear modules of a "
                            f"{config['model_type']} block: {', '.join(shapes)}")
    per_layer = sum(rank * sum(shapes[k]) for k in keys)
    return per_layer * _adapted_layers(config, num_layers)


def base_parameter_count(config: dict) -> int:
    """Parameters of the base model as mlx-lm builds it (embeddings and lm_head included)."""
    d, shapes = _dims(config), linear_shapes(config)
    biases = 0
    if not d["phi3"]:  # llama's optional biases, on the output side of each linear
        attn = [k for k in shapes if k.startswith("self_attn.")]
        biases += config.get("attention_bias", False) * sum(shapes[k][1] for k in attn)
        mlp = [k for k in shapes if k.startswith("mlp.")]
        biases += config.get("mlp_bias", False) * sum(shapes[k][1] for k in mlp)
    block = sum(i * o for i, o in shapes.values()) + biases + 2 * d["hidden"]  # + 2 RMSNorms
    embeddings = d["vocab"] * d["hidden"] * (1 if d["tied"] else 2)
    return d["layers"] * block + embeddings + d["hidden"]  # + the final norm


def memory_estimate(config: dict, lora: dict, train: dict, dtype_bytes: int,
                    seq_len: int | None = None) -> dict:
    """Peak training memory in GB (decimal), by part. ``lora`` and ``train`` are params.yaml's
    sections; ``seq_len`` is the longest training sample (default: train.max_seq_length).

    - weights: the base parameters in their dtype (``dtype_bytes`` each);
    - adapters, their gradients and Adam's two moments: float32 (mlx-lm makes LoRA float32);
    - activations kept for the backward pass, only for the adapted (last N) blocks, since the
      frozen blocks below them take no part in it. Per token and block, approximately:
      q, k, v and the attention output ((heads + 2 kv_heads + heads) * head_dim), the
      attention probabilities (heads * seq_len), the MLP's gate, up and product
      (3 * intermediate), residual stream and norm outputs (4 * hidden), and per adapted
      linear its dropped-out input (d_in) and x @ A (rank). With gradient checkpointing only
      each block's input (hidden) is kept, plus one block's worth recomputed during backward;
    - logits: tokens x vocab in float32, twice (softmax and its gradient).
    A floor more than a ceiling: MLX's temporaries and caches come on top. For the default run
    (SmolLM2-135M in float32, batch 4, longest sample 243 tokens) it gives 2.5 GB, 1.1 GB with
    checkpointing, against measured peaks of 2.6-3.3 GB and 1.3 GB.
    """
    d, shapes = _dims(config), linear_shapes(config)
    keys, rank = lora["keys"], lora["rank"]
    layers = _adapted_layers(config, lora.get("num_layers", -1))
    seq = min(seq_len or train["max_seq_length"], train["max_seq_length"])
    tokens = train["batch_size"] * seq
    trainable = lora_parameter_count(config, keys, rank, layers)
    base = base_parameter_count(config)
    per_token_block = ((2 * d["heads"] + 2 * d["kv_heads"]) * d["head_dim"] + d["heads"] * seq
                       + 3 * d["intermediate"] + 4 * d["hidden"]
                       + sum(shapes[k][0] + rank for k in keys))
    block_gb = tokens * per_token_block * dtype_bytes / GB
    full = layers * block_gb
    checkpointed = layers * tokens * d["hidden"] * dtype_bytes / GB + block_gb
    est = {
        "base_parameters": base, "trainable_parameters": trainable, "tokens": tokens,
        "seq_len": seq, "batch_size": train["batch_size"], "dtype_bytes": dtype_bytes,
        "grad_checkpoint": bool(train.get("grad_checkpoint")),
        "weights_gb": base * dtype_bytes / GB,
        "adapters_gb": trainable * 4 / GB,
        "gradients_gb": trainable * 4 / GB,
        "optimizer_gb": 2 * trainable * 4 / GB,
        "activations_full_gb": full,
        "activations_checkpointed_gb": checkpointed,
        "logits_gb": 2 * tokens * d["vocab"] * 4 / GB,
    }
    est["activations_gb"] = checkpointed if est["grad_checkpoint"] else full
    est["total_gb"] = sum(est[k] for k in ("weights_gb", "adapters_gb", "gradients_gb",
                                           "optimizer_gb", "activations_gb", "logits_gb"))
    return est


def physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def report(est: dict, physical_gb: float | None = None, out=None, err=None) -> bool:
    """Print the estimate in a few lines; warn loudly on stderr if it exceeds physical memory.
    Returns whether it fits."""
    out, err = out or sys.stdout, err or sys.stderr
    physical_gb = physical_memory_gb() if physical_gb is None else physical_gb
    other = "without" if est["grad_checkpoint"] else "with"
    other_gb = est["activations_full_gb" if est["grad_checkpoint"] else
                   "activations_checkpointed_gb"]
    lora_gb = est["adapters_gb"] + est["gradients_gb"] + est["optimizer_gb"]
    print(f"memory estimate for batches of {est['batch_size']} x {est['seq_len']} tokens "
          f"({est['dtype_bytes']}-byte weights, gradient checkpointing "
          f"{'on' if est['grad_checkpoint'] else 'off'}):\n"
          f"  weights {est['weights_gb']:.2f} GB ({est['base_parameters']:,} parameters), "
          f"LoRA + gradients + Adam {lora_gb:.2f} GB, activations {est['activations_gb']:.2f} GB "
          f"({other_gb:.2f} GB {other} checkpointing), logits {est['logits_gb']:.2f} GB\n"
          f"  total ~{est['total_gb']:.1f} GB of {physical_gb:.1f} GB physical memory", file=out)
    fits = est["total_gb"] <= physical_gb
    if not fits:
        bar = "!" * 78
        print(f"{bar}\nWARNING: training needs an estimated {est['total_gb']:.1f} GB, more than "
              f"this machine's {physical_gb:.1f} GB of memory:\nit will swap or be killed. Lower "
              "train.batch_size or train.max_seq_length, set train.grad_checkpoint: true,\nadapt "
              f"fewer lora.num_layers, or pick a smaller model.\n{bar}", file=err, flush=True)
    return fits


def report_before_training(model_dir: str | Path, lora: dict, train: dict, trainable: int,
                           seq_len: int | None = None, dtype_bytes: int | None = None) -> None:
    """What stages/train.py prints after apply_lora: the estimate, and a loud warning if the
    real trainable count differs from the formula (one of the two has a bug). ``dtype_bytes``
    defaults to the checkpoint's torch_dtype (the stage passes 4 when it runs in float32)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype_bytes = dtype_bytes or {"float32": 4}.get(config.get("torch_dtype"), 2)
    try:
        expected = lora_parameter_count(config, lora["keys"], lora["rank"],
                                        lora.get("num_layers", -1))
        est = memory_estimate(config, lora, train, dtype_bytes, seq_len)
    except EstimateError as e:
        print(f"(no estimate: {e})")
        return
    if expected != trainable:
        print(f"{'!' * 78}\nWARNING: the model has {trainable:,} trainable parameters but "
              f"voicetune/models/memory.py expects {expected:,}\nfor this LoRA: a bug in one of the "
              f"two (the memory estimate below is off too).\n{'!' * 78}", file=sys.stderr,
              flush=True)
    else:
        print(f"expected trainable parameters: {expected:,} (matches)")
    report(est)
