"""Before training: the expected trainable-parameter count and a memory estimate, computed from
the model's config.json alone (no weights loaded), so that a run that cannot fit is flagged
before it swaps for an hour, and a LoRA that adapts the wrong modules shows up as a count.

Supports the layouts of mlx-lm's ``llama`` (also used for ``mistral``) and ``phi3`` models.
"""
from __future__ import annotations

import json
import math
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


def batch_shape(samples, batch_size: int, max_seq_length: int) -> dict:
    """The batch that sets the peak, from the training samples' ``(length, answer offset)``
    pairs: batches are made of length-sorted samples (as voicetune.train.batching makes
    them), so the last, longest one is the widest. ``width``: the model's input length for it
    (its longest sample padded to a multiple of 32, capped at max_seq_length - 1); ``targets``: the most trained (answer) tokens in any batch, the rows the
    loss projects onto the vocabulary."""
    samples = sorted((min(n, max_seq_length), offset) for n, offset in samples)
    if not samples:
        return {"width": None, "targets": None}
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    # the model's input: rows padded to a multiple of PAD_MULTIPLE (voicetune.train.batching)
    longest = max(n for n, _ in samples)
    return {"width": min(PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE), max_seq_length - 1),
            "targets": max(sum(max(0, n - max(offset, 1)) for n, offset in b) for b in batches)}


PAD_MULTIPLE = 32  # as voicetune.train.batching (models may not import train)
AS_CONFIGURED = "config"  # memory_estimate's quantize: what config.json's "quantization" says


def quantization(config: dict, quantize=AS_CONFIGURED, group_size: int | None = None
                 ) -> tuple[int | None, int]:
    """(bits, group_size) of the weights: config.json's ``quantization`` (an mlx-lm quantized
    folder) for ``AS_CONFIGURED``, else the planned ``quantize`` (None: float weights)."""
    if quantize == AS_CONFIGURED:
        q = config.get("quantization") or {}
        return q.get("bits"), q.get("group_size", 64)
    return quantize, group_size or 64


def weights_bytes(config: dict, dtype_bytes: int, quantize=AS_CONFIGURED,
                  group_size: int | None = None) -> float:
    """Bytes of the base weights. Quantized (mlx-lm: every Linear and Embedding whose weight's
    last dimension is a multiple of group_size), a weight costs bits/8 bytes plus a scale and a
    bias per group in the float dtype (2 * dtype_bytes / group_size); norms and linear
    biases stay float."""
    bits, group = quantization(config, quantize, group_size)
    total = base_parameter_count(config)
    if not bits:
        return total * dtype_bytes
    quantized = quantized_parameter_count(config, group)
    return (total - quantized) * dtype_bytes + quantized * (bits / 8 + 2 * dtype_bytes / group)


def quantized_parameter_count(config: dict, group: int) -> int:
    """The weights mlx-lm quantizes at this group size: every linear's (d_out x d_in), the
    embedding (vocab x hidden) and an untied lm_head whose last dimension splits into groups."""
    d, shapes = _dims(config), linear_shapes(config)
    weights = [(d["layers"] * i * o, i) for i, o in shapes.values()]
    weights += [(d["vocab"] * d["hidden"], d["hidden"])] * (1 if d["tied"] else 2)
    return sum(n for n, last in weights if last % group == 0)


# Copies of the attention scores per token, head and key position (the scores and the
# softmax probabilities, both kept for the backward pass), and of the (trained positions x
# vocab) float32 logits (the logits, their softmax and its gradient): fit to MLX's measured
# peaks (voicetune/bench/memory_fit.py, docs/memory.md).
ATTENTION_COPIES = 2
LOGITS_COPIES = 3
# With gradient checkpointing, besides each block's input: the block being recomputed and its
# backward's intermediates, about two blocks' worth at the peak (measured 1.16 GB where one
# block gave 1.04)
CHECKPOINT_BLOCKS = 2


def memory_estimate(config: dict, lora: dict, train: dict, dtype_bytes: int,
                    seq_len: int | None = None, targets: int | None = None,
                    quantize=AS_CONFIGURED, group_size: int | None = None,
                    dequantized: bool = False) -> dict:
    """Peak training memory in GB (decimal), by part. ``lora`` and ``train`` are params.yaml's
    sections; ``seq_len`` is the longest training sample (default: train.max_seq_length);
    ``targets`` the most trained (answer) tokens in a batch (default: every token, a bound);
    ``quantize`` the weights' bits: config.json's ``quantization`` by default, or a planned
    4, 8 or None (float) with ``group_size`` (default 64). ``dtype_bytes`` is the float dtype
    the weights compute in: 4 on a CPU (the train stage casts to float32, quantization scales
    included), the checkpoint's (2 for bf16/f16) on a Mac.

    - weights: the base parameters (see ``weights_bytes`` for quantized ones);
    - adapters, their gradients and Adam's two moments: float32 (mlx-lm makes LoRA float32);
    - activations kept for the backward pass, only for the adapted (last N) blocks, since the
      frozen blocks below them take no part in it. Per token and block, approximately:
      q, k, v and the attention output ((heads + 2 kv_heads + heads) * head_dim), the
      attention scores and probabilities (2 * heads * seq_len), the MLP's gate, up and product
      (3 * intermediate), residual stream and norm outputs (4 * hidden), and per adapted
      linear its dropped-out input (d_in) and x @ A (rank). With gradient checkpointing only
      each block's input (hidden) is kept, plus CHECKPOINT_BLOCKS blocks' worth during the
      backward (the block recomputed and its gradients' intermediates);
    - dequantized weights (``dequantized``: a quantized base on an x86 CPU with
      ``kernels.fast_cpu``, whose quantized layers multiply through BLAS): a float copy of
      every quantized weight, as if all were alive at once (the dequantizations depend on the
      weights alone, so MLX may compute them all before their products): SmolLM2 at 8 bits
      peaked at 3.17 GB against 2.95 GB in float32 (docs/memory.md). On a Mac (Metal's
      quantized kernels) there are none;
    - logits: the trained positions x vocab in float32 (the loss projects only those onto the
      vocabulary), LOGITS_COPIES times (the logits, their softmax and its gradient).
    Measured on SmolLM2-135M (docs/memory.md) it is within ~10% of MLX's peak; the
    activations are in the float dtype (``dtype_bytes``), so on a Mac (bf16) they halve too.
    """
    d, shapes = _dims(config), linear_shapes(config)
    keys, rank = lora["keys"], lora["rank"]
    layers = _adapted_layers(config, lora.get("num_layers", -1))
    seq = min(seq_len or train["max_seq_length"], train["max_seq_length"])
    tokens = train["batch_size"] * seq
    targets = tokens if targets is None else min(targets, tokens)
    trainable = lora_parameter_count(config, keys, rank, layers)
    base = base_parameter_count(config)
    bits, group = quantization(config, quantize, group_size)
    per_token_block = ((2 * d["heads"] + 2 * d["kv_heads"]) * d["head_dim"]
                       + ATTENTION_COPIES * d["heads"] * seq
                       + 3 * d["intermediate"] + 4 * d["hidden"]
                       + sum(shapes[k][0] + rank for k in keys))
    block_gb = tokens * per_token_block * dtype_bytes / GB
    full = layers * block_gb
    checkpointed = layers * tokens * d["hidden"] * dtype_bytes / GB + CHECKPOINT_BLOCKS * block_gb
    est = {
        "base_parameters": base, "trainable_parameters": trainable, "tokens": tokens,
        "targets": targets, "seq_len": seq, "batch_size": train["batch_size"],
        "dtype_bytes": dtype_bytes, "quantize_bits": bits, "group_size": group if bits else None,
        "grad_checkpoint": bool(train.get("grad_checkpoint")),
        "weights_gb": weights_bytes(config, dtype_bytes, quantize, group_size) / GB,
        "adapters_gb": trainable * 4 / GB,
        "gradients_gb": trainable * 4 / GB,
        "optimizer_gb": 2 * trainable * 4 / GB,
        "activations_full_gb": full,
        "activations_checkpointed_gb": checkpointed,
        "logits_gb": LOGITS_COPIES * targets * d["vocab"] * 4 / GB,
        "dequantized_gb": quantized_parameter_count(config, group) * dtype_bytes / GB
        if dequantized and bits else 0.0,
    }
    est["activations_gb"] = checkpointed if est["grad_checkpoint"] else full
    est["total_gb"] = sum(est[k] for k in ("weights_gb", "adapters_gb", "gradients_gb",
                                           "optimizer_gb", "activations_gb", "logits_gb",
                                           "dequantized_gb"))
    return est


def physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def mac_usable_gb(ram_gib: float) -> float:
    """What MLX may keep on a Mac with ``ram_gib`` GiB of unified memory (an "8 GB" Mac has 8
    GiB), in GB: Metal's recommended working set (``recommendedMaxWorkingSetSize``), which
    macOS sets to 2/3 of RAM up to 32 GiB and 3/4 above (16 GiB -> 10922.67 MiB, 64 GiB -> 48
    GiB, as llama.cpp's Metal logs show). Newer macOS releases report more on some large
    machines (107.5 GiB of 128 GiB): the rule errs low. ``sudo sysctl iogpu.wired_limit_mb``
    raises the limit; plan for that with train.memory_limit_gb."""
    share = 2 / 3 if ram_gib <= 32 else 3 / 4
    return ram_gib * 2**30 * share / GB


def usable_memory_gb() -> tuple[float, str]:
    """This machine's memory for training, in GB, and where the figure comes from: on Apple
    Silicon Metal's recommended working set (what MLX may wire without swapping), elsewhere
    the physical memory."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            info = (mx.device_info if hasattr(mx, "device_info") else mx.metal.device_info)()
            return (info["max_recommended_working_set_size"] / GB,
                    f"Metal's recommended working set of {info['memory_size'] / GB:.1f} GB")
    except (ImportError, AttributeError, KeyError):
        pass
    return physical_memory_gb(), "physical memory"


def memory_limit(train: dict) -> tuple[float, str]:
    """The memory a run must fit in: train.memory_limit_gb when set, else this machine's."""
    if train.get("memory_limit_gb") is not None:
        return float(train["memory_limit_gb"]), "train.memory_limit_gb"
    return usable_memory_gb()


class MemoryPlanError(UserError):
    """The run cannot fit: the message names the settings that would make it fit."""


# Changes the plan may suggest, cheapest first: checkpointing costs ~20% more time per step
# and nothing else; quantizing the frozen base costs some quality (8 bits little, 4 bits more);
# a smaller batch changes the run (fewer samples per step); a shorter max_seq_length cuts
# the longest samples.
COST = {"grad_checkpoint": 1, "quantize_8": 2, "quantize_4": 3, "batch_halving": 2,
        "seq_halving": 4}


def _options(train: dict, bits: int | None, seq: int, configured_bits) -> dict:
    batch, opts = train["batch_size"], {}
    opts["grad_checkpoint"] = [bool(train.get("grad_checkpoint"))] + \
        ([True] if not train.get("grad_checkpoint") else [])
    opts["quantize"] = [bits] + ([] if configured_bits else
                                 [b for b in (8, 4) if bits is None or b < bits])
    opts["batch_size"] = sorted({max(1, batch >> k) for k in range(batch.bit_length())},
                                reverse=True)
    shorter = [2**k for k in range(8, 16) if 2**k < seq][-3:]  # up to 3 powers of two below
    opts["max_seq_length"] = [train["max_seq_length"]] + sorted(shorter, reverse=True)
    return opts


def plan(config: dict, lora: dict, train: dict, usable_gb: float, dtype_bytes: int,
         seq_len: int | None = None, targets: int | None = None, quantize=AS_CONFIGURED,
         group_size: int | None = None, dequantized: bool = False) -> list[dict]:
    """Every combination of the settings that lower memory (gradient checkpointing, quantizing
    the base to 8 or 4 bits, halving train.batch_size, shortening train.max_seq_length below the
    longest sample) with its estimate, whether it fits in ``usable_gb``, the params changes it
    takes (``changes``: {"train.grad_checkpoint": True, ...}) and their ``cost`` (see COST):
    cheapest first. ``quantize`` as in ``memory_estimate``; a base that config.json says is
    already quantized is planned as it is."""
    bits, group = quantization(config, quantize, group_size)
    configured_bits = quantize == AS_CONFIGURED and bits is not None
    seq = min(seq_len or train["max_seq_length"], train["max_seq_length"])
    opts = _options(train, bits, seq, configured_bits)
    rows = []
    for ckpt in opts["grad_checkpoint"]:
        for q in opts["quantize"]:
            for batch in opts["batch_size"]:
                for max_len in opts["max_seq_length"]:
                    t = {**train, "grad_checkpoint": ckpt, "batch_size": batch,
                         "max_seq_length": max_len}
                    share = min(1.0, batch / train["batch_size"]) * min(1.0, max_len / seq)
                    est = memory_estimate(config, lora, t, dtype_bytes, seq_len=seq,
                                          targets=None if targets is None else
                                          math.ceil(targets * share),
                                          quantize=q if not configured_bits else AS_CONFIGURED,
                                          group_size=group, dequantized=dequantized)
                    changes = {}
                    if ckpt != bool(train.get("grad_checkpoint")):
                        changes["train.grad_checkpoint"] = ckpt
                    if q != bits:
                        changes["model.quantize"] = q
                    if batch != train["batch_size"]:
                        changes["train.batch_size"] = batch
                    if max_len != train["max_seq_length"]:
                        changes["train.max_seq_length"] = max_len
                    cost = (COST["grad_checkpoint"] * (ckpt and not train.get("grad_checkpoint"))
                            + (COST[f"quantize_{q}"] if q != bits else 0)
                            + COST["batch_halving"] * (train["batch_size"] // batch).bit_length()
                            - COST["batch_halving"]
                            + COST["seq_halving"] * (opts["max_seq_length"].index(max_len)))
                    rows.append({"grad_checkpoint": ckpt, "quantize": q, "batch_size": batch,
                                 "max_seq_length": max_len, "total_gb": est["total_gb"],
                                 "fits": est["total_gb"] <= usable_gb, "changes": changes,
                                 "cost": cost})
    return sorted(rows, key=lambda r: (r["cost"], r["total_gb"]))


def _show(value) -> str:
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) \
        if not isinstance(value, (int, float)) or isinstance(value, bool) else str(value)


def describe(changes: dict) -> str:
    return " and ".join(f"{k}: {_show(v)}" for k, v in changes.items())


def _milder_or_equal(a: dict, b: dict) -> bool:
    """Whether plan row ``a`` changes every setting no more than ``b`` does."""
    bits = {None: 3, 8: 2, 4: 1}
    return (a["grad_checkpoint"] <= b["grad_checkpoint"]
            and bits.get(a["quantize"], 0) >= bits.get(b["quantize"], 0)
            and a["batch_size"] >= b["batch_size"] and a["max_seq_length"] >= b["max_seq_length"])


def cheapest_fixes(rows: list[dict], limit: int = 3) -> list[dict]:
    """The cheapest fitting rows of a ``plan`` that change something, leaving out any row for
    which one already chosen changes every setting no more."""
    chosen = []
    for row in rows:
        if not row["fits"] or not row["changes"]:
            continue
        if any(_milder_or_equal(c, row) for c in chosen):
            continue
        chosen.append(row)
        if len(chosen) == limit:
            break
    return chosen


def report(est: dict, usable_gb: float | None = None, source: str = "physical memory",
           out=None) -> bool:
    """Print the estimate in a few lines; returns whether it fits in ``usable_gb``."""
    out = out or sys.stdout
    usable_gb = physical_memory_gb() if usable_gb is None else usable_gb
    other = "without" if est["grad_checkpoint"] else "with"
    other_gb = est["activations_full_gb" if est["grad_checkpoint"] else
                   "activations_checkpointed_gb"]
    lora_gb = est["adapters_gb"] + est["gradients_gb"] + est["optimizer_gb"]
    weights = (f"{est['quantize_bits']}-bit weights (groups of {est['group_size']}, "
               f"{est['dtype_bytes']}-byte scales)" if est["quantize_bits"]
               else f"{est['dtype_bytes']}-byte weights")
    print(f"memory estimate for batches of {est['batch_size']} x {est['seq_len']} tokens "
          f"({weights}, gradient checkpointing {'on' if est['grad_checkpoint'] else 'off'}):\n"
          f"  weights {est['weights_gb']:.2f} GB ({est['base_parameters']:,} parameters), "
          f"LoRA + gradients + Adam {lora_gb:.2f} GB, activations {est['activations_gb']:.2f} GB "
          f"({other_gb:.2f} GB {other} checkpointing), logits {est['logits_gb']:.2f} GB"
          + (f", dequantized weights {est['dequantized_gb']:.2f} GB (the CPU fast path)"
             if est.get("dequantized_gb") else "") + "\n"
          f"  total ~{est['total_gb']:.1f} GB of {usable_gb:.1f} GB ({source})", file=out)
    return est["total_gb"] <= usable_gb


def refusal(est: dict, rows: list[dict], usable_gb: float, source: str) -> str:
    """The message of a run that cannot fit, naming the cheapest settings that would."""
    fixes = cheapest_fixes(rows)
    head = (f"training needs an estimated {est['total_gb']:.1f} GB, more than the "
            f"{usable_gb:.1f} GB it may use ({source}): it would swap or be killed.")
    if fixes:
        todo = " or ".join(f"set {describe(r['changes'])} (est. {r['total_gb']:.1f} GB)"
                           for r in fixes)
        head += f"\nTo fit: {todo}."
    else:
        head += ("\nNo setting of checkpointing, quantization, batch size or sequence length "
                 "fits: adapt fewer lora.num_layers or pick a smaller model.")
    return head + ("\n`make plan` lists what fits; train.memory_limit_gb sets the limit "
                   "planned against (e.g. after raising it with iogpu.wired_limit_mb).")


def check_before_training(model_dir: str | Path, lora: dict, train: dict, trainable: int,
                          seq_len: int | None = None, targets: int | None = None,
                          dtype_bytes: int | None = None, usable: tuple[float, str] | None = None,
                          out=None, err=None, dequantized: bool = False) -> dict | None:
    """What stages/train.py runs after apply_lora, before any step: the estimate, a loud
    warning if the real trainable count differs from the formula (one of the two has a bug),
    and a MemoryPlanError (a UserError) naming the cheapest settings that fit when the run
    cannot fit in train.memory_limit_gb, or else in this machine's usable memory
    (``usable_memory_gb``). ``dtype_bytes`` defaults to the checkpoint's torch_dtype (the stage
    passes 4 when it runs in float32); a quantized base is read from config.json. Returns the
    estimate (None for an architecture it has no formula for)."""
    out, err = out or sys.stdout, err or sys.stderr
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype_bytes = dtype_bytes or {"float32": 4}.get(config.get("torch_dtype"), 2)
    try:
        expected = lora_parameter_count(config, lora["keys"], lora["rank"],
                                        lora.get("num_layers", -1))
        est = memory_estimate(config, lora, train, dtype_bytes, seq_len, targets,
                              dequantized=dequantized)
    except EstimateError as e:
        print(f"(no estimate: {e})", file=out)
        return None
    if expected != trainable:
        print(f"{'!' * 78}\nWARNING: the model has {trainable:,} trainable parameters but "
              f"voicetune/models/memory.py expects {expected:,}\nfor this LoRA: a bug in one of the "
              f"two (the memory estimate below is off too).\n{'!' * 78}", file=err, flush=True)
    else:
        print(f"expected trainable parameters: {expected:,} (matches)", file=out)
    usable_gb, source = usable or memory_limit(train)
    if not report(est, usable_gb, source, out):
        rows = plan(config, lora, train, usable_gb, dtype_bytes, seq_len, targets,
                    dequantized=dequantized)
        raise MemoryPlanError(refusal(est, rows, usable_gb, source))
    return est


BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def plan_table(config: dict, lora: dict, train: dict, machines: list[tuple[str, float]],
               dtype_bytes: int, seq_len: int | None = None, targets: int | None = None,
               quantize=AS_CONFIGURED, group_size: int | None = None) -> str:
    """The plan as text, for ``machines`` [(name, usable GB)]: per quantization and
    checkpointing, the estimate at train.batch_size and, per machine, the largest batch size
    that fits at this sequence length; then per machine whether the configured run fits and,
    if not, the cheapest settings that do."""
    bits, group = quantization(config, quantize, group_size)
    configured = quantize == AS_CONFIGURED and bits is not None
    seq = min(seq_len or train["max_seq_length"], train["max_seq_length"])
    batch = train["batch_size"]
    head = (f"{'quantize':9} {'checkpoint':10} {f'est. GB, batch {batch}':>17}  "
            + "  ".join(f"{name:>14}" for name, _ in machines))
    lines = [f"batches of {batch} x {seq} tokens ({dtype_bytes}-byte floats); per machine the "
             "largest train.batch_size that fits", head, "-" * len(head)]
    for q in ([bits] if configured else [None, 8, 4]):
        for ckpt in (False, True):
            def est(b):
                share = b / batch
                return memory_estimate(
                    config, lora, {**train, "batch_size": b, "grad_checkpoint": ckpt},
                    dtype_bytes, seq, None if targets is None else math.ceil(targets * share),
                    q if not configured else AS_CONFIGURED, group)["total_gb"]
            cells = []
            for _, usable in machines:
                fitting = [b for b in BATCH_SIZES if est(b) <= usable]
                cells.append(f"batch <= {fitting[-1]}" if fitting else "no")
            lines.append(f"{_show(q):9} {'on' if ckpt else 'off':10} {est(batch):17.1f}  "
                         + "  ".join(f"{c:>14}" for c in cells))
    lines.append("")
    for name, usable in machines:
        e = memory_estimate(config, lora, train, dtype_bytes, seq, targets, quantize, group_size)
        if e["total_gb"] <= usable:
            lines.append(f"{name} ({usable:.1f} GB usable): the configured run fits "
                         f"(est. {e['total_gb']:.1f} GB)")
            continue
        fixes = cheapest_fixes(plan(config, lora, train, usable, dtype_bytes, seq, targets,
                                    quantize, group_size))
        todo = " or ".join(f"{describe(r['changes'])} (est. {r['total_gb']:.1f} GB)"
                           for r in fixes) or "nothing in the plan fits"
        lines.append(f"{name} ({usable:.1f} GB usable): est. {e['total_gb']:.1f} GB does not "
                     f"fit; cheapest: {todo}")
    return "\n".join(lines)
