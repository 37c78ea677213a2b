"""The benchmark's MLX workers, one per process: a LoRA training run and a generation run, with
the fast path (voicetune.core.kernels) off or on, each with its own matmul probe."""
from __future__ import annotations

import statistics
import time

from voicetune.bench.ceiling import mlx_matmul_probe

# The three contenders, in the order each repeat runs them; the MLX ones by fast-path setting
FRAMEWORKS = ("mlx_stock", "mlx_fast", "torch")
FASTPATH = {"mlx_stock": "off", "mlx_fast": "on"}
LORA_DROPOUT = 0.1


def swappable() -> dict[str, object]:
    """The mlx-lm functions the fast path may replace, as they are now."""
    import mlx.nn as nn
    from mlx_lm.models import llama, phi3

    names = {"llama.swiglu": (llama, "swiglu"), "phi3.swiglu": (phi3, "swiglu"),
             "llama.scaled_dot_product_attention": (llama, "scaled_dot_product_attention"),
             "nn.Dropout.__call__": (nn.Dropout, "__call__"),
             "nn.losses.cross_entropy": (nn.losses, "cross_entropy")}
    return {k: getattr(owner, attr, None) for k, (owner, attr) in names.items()}


def swapped_since(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if after[k] is not before[k])


def _enable_fastpath(setting: str) -> dict:
    """Switch the fast path on or off for this worker process, before any model is built;
    what it swapped into mlx-lm is recorded (compared by identity, before and after)."""
    from voicetune.core import kernels as fastpath

    before = swappable()
    active = fastpath.enable(setting)
    return {"fastpath": setting, "fastpath_active": bool(active),
            "fastpath_swapped": swapped_since(before, swappable())}


def mlx_train_worker(model_dir: str, keys: list[str], batch: int, seq_len: int, steps: int,
                     warmup: int, grad_checkpoint: bool, rank: int = 16, seed: int = 0,
                     fastpath: str = "off") -> dict:
    """Median time of MLX LoRA steps (the pipeline's own compiled step) on random tokens,
    every position trained, as PyTorch's side does; the fast path ``fastpath`` (on/off)."""
    fast = _enable_fastpath(fastpath)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load

    from voicetune.models.lora import apply_lora
    from voicetune.train.batching import Batch, target_index
    from voicetune.train.sft import make_step

    gflops = mlx_matmul_probe()
    mx.random.seed(seed)
    model, _ = load(model_dir)
    model.set_dtype(mx.float32)
    apply_lora(model, rank, 20.0, LORA_DROPOUT, keys, -1)
    optimizer = optim.Adam(learning_rate=1e-5)
    step, state = make_step(model, optimizer, grad_checkpoint)
    model.train()
    rng = np.random.default_rng(seed)
    vocab = model.args.vocab_size
    n = batch * seq_len  # inputs are seq_len long: seq_len + 1 tokens, all targets trained
    offsets, lengths = [0] * batch, [seq_len + 1] * batch
    targets = target_index(offsets, lengths, seq_len + 1)
    times = []
    mx.reset_peak_memory()
    for i in range(warmup + steps):
        tokens = mx.array(rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32))
        tic = time.perf_counter()
        loss, _ = step(*Batch(tokens, mx.array(list(zip(offsets, lengths))), *targets))
        mx.eval(state, loss)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    median = statistics.median(times)
    return {"seconds_per_step": median, "step_times": times, "tokens_per_s": n / median,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "last_loss": loss.item(),
            "matmul_gflops": gflops, **fast}


def mlx_generate_worker(model_dir: str, batch: int, prompt_len: int, new_tokens: int,
                        seed: int = 0, fastpath: str = "off") -> dict:
    """Greedy generation with the KV cache on random prompts, exactly ``new_tokens`` each,
    at batch 1 and at ``batch``: tokens/s including the prefill."""
    fast = _enable_fastpath(fastpath)
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    gflops = mlx_matmul_probe()
    model, _ = load(model_dir)
    model.set_dtype(mx.float32)
    rng = np.random.default_rng(seed)

    def run(size: int, count: int) -> float:
        tokens = mx.array(rng.integers(0, model.args.vocab_size, (size, prompt_len), dtype=np.int32))
        cache = make_prompt_cache(model)
        tic = time.perf_counter()
        for _ in range(count):
            tokens = mx.argmax(model(tokens, cache=cache)[:, -1:], axis=-1)
            mx.eval(tokens)
        return time.perf_counter() - tic

    result = {"matmul_gflops": gflops, **fast}
    for name, size in (("batch_1", 1), (f"batch_{batch}", batch)):
        run(size, 4)  # warm-up at this batch size: compiled kernels are traced per shape
        seconds = run(size, new_tokens)
        result[name] = {"seconds": seconds, "tokens_per_s": size * new_tokens / seconds}
    return result
