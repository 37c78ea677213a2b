"""The ceiling a LoRA step cannot beat on this machine: its FLOPs per token, the best measured
matmul rate, and efficiency as a share of it (refused above 100%: the probes under-read)."""
from __future__ import annotations

import time

from voicetune.models.memory import linear_shapes


def training_flops_per_token(config: dict, keys: list[str], rank: int, seq_len: int) -> float:
    """Useful FLOPs of one LoRA training step per token (no recomputation counted)."""
    shapes = linear_shapes(config)
    layers, heads, head_dim = config["num_hidden_layers"], config["num_attention_heads"], \
        linear_shapes(config)["self_attn.o_proj"][0] // config["num_attention_heads"]
    base = layers * sum(i * o for i, o in shapes.values()) + config["hidden_size"] * config["vocab_size"]
    # QK^T and AV over a causal context of seq_len/2 on average, per layer
    attention = layers * 2 * 2 * heads * head_dim * seq_len / 2
    adapters = layers * sum(rank * sum(shapes[k]) for k in keys)
    # forward 2 per weight; backward 2 for input gradients; adapters also get weight gradients
    return 2 * (base + attention) + 2 * (base + attention) + 3 * 2 * adapters


def mlx_matmul_probe(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """MLX's float32 matmul rate in GFLOP/s: the best (fastest) of ``repeats`` products at
    each size. The best, not the median: the machine is shared, and other jobs can only make
    a matmul slower than this machine can do it."""
    import mlx.core as mx

    rates = []
    for n in sizes:
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a @ b)
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(a @ b)
            rates.append(2 * n**3 / (time.perf_counter() - tic) / 1e9)
    return max(rates)


def numpy_matmul_probe(n: int = 1024, repeats: int = 5) -> float:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    return max(2 * n**3 / seconds(lambda: a @ a) / 1e9 for _ in range(repeats))


def seconds(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def best_probe(probes: list[dict]) -> dict:
    """The ceiling's matmul rate: the fastest of all probes (each {"where", "gflops"})."""
    if not probes:
        raise ValueError("no matmul probe: the ceiling is unknown")
    return max(probes, key=lambda p: p["gflops"])


class CeilingError(ValueError):
    """A measured rate above the ceiling: the matmul probes under-read."""


def efficiency(tokens_per_s: float, ceiling: dict, label: str) -> float:
    """``tokens_per_s`` as a share of ``ceiling`` ({"tokens_per_s", "gflops",
    "flops_per_token"}); refuses a share above 100%, which no implementation can reach."""
    share = tokens_per_s / ceiling["tokens_per_s"]
    if share > 1:
        implied = tokens_per_s * ceiling["flops_per_token"] / 1e9
        raise CeilingError(
            f"{label}: {tokens_per_s:.1f} tokens/s is {100 * share:.0f}% of the ceiling "
            f"({ceiling['tokens_per_s']:.1f} tokens/s), which is impossible: the matmul probes "
            f"under-read (best {ceiling['gflops']:.0f} GFLOP/s, while this run implies at least "
            f"{implied:.0f} GFLOP/s). Efficiency not shown; rerun when the machine is quieter.")
    return share


def elementwise_rates() -> dict:
    """numpy's exp, for reference: what a vectorized exp does on this CPU."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(4 * 9 * 192 * 192, dtype=np.float32)
    np.exp(x)
    return {"numpy_exp_melem_per_s": x.size / min(seconds(lambda: np.exp(x)) for _ in range(7)) / 1e6}
