"""PyTorch + PEFT side of the MLX-vs-PyTorch LoRA benchmark (needs `pip install -e '.[bench]'`).

    python -m voicetune.bench.torch_peft --model DIR [--batch 4] [--seq-len 256] [--steps 5]
        [--warmup 2] [--grad-checkpoint] [--keys self_attn.q_proj self_attn.v_proj ...]
        [--rank 16] [--scale 20] [--dropout 0.1] [--num-layers -1] [--threads N]
    python -m voicetune.bench.torch_peft --model DIR --generate [--batch 4] [--prompt-len 64]
        [--new-tokens 32]

Prints one JSON line, with the process's own matmul rate (``matmul_gflops``, a probe of the
benchmark's ceiling). DIR is a Hugging Face folder (llama or phi3 config.json, float32
model.safetensors; without weights the model is randomly initialised with the same shapes).
Run each configuration in its own process: peak memory is the process's max RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

try:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as exc:  # the optional [bench] extra is not installed
    torch = None
    _IMPORT_ERROR = exc

INSTALL_HINT = "pip install -e '.[bench]'"
MISSING_EXIT_CODE = 3


def _require_torch() -> None:
    if torch is None:
        raise ImportError(f"the PyTorch benchmark needs torch and peft ({_IMPORT_ERROR}): "
                          f"{INSTALL_HINT}")


def _peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def _set_threads(threads: int | None) -> dict:
    default = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # OpenMP spin-waits by default; on shared cores OMP_WAIT_POLICY=PASSIVE can matter a lot
    return {"torch": torch.__version__, "default_threads": default,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def matmul_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """PyTorch's float32 matmul rate in GFLOP/s, the best of ``repeats`` products at each
    size: a probe of the ceiling (voicetune.bench.training takes the best of all its probes)."""
    rates = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return max(rates)


def load_model(model_dir: str | Path):
    """float32 causal LM from ``model_dir``: its weights when model.safetensors is there,
    else a random init of the same config. Returns (model, weights_loaded)."""
    _require_torch()
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), True
    config = AutoConfig.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), False


def _blocks(model):
    return model.model.layers  # llama and phi3 alike


def _block_linear_names(block) -> list[str]:
    return sorted(n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear))


def default_keys(model) -> list[str]:
    """The attention projections (llama: q/k/v/o_proj; phi3: qkv_proj, o_proj), as the
    pipeline's default lora.keys and the Phi-3 recipe."""
    return [n for n in _block_linear_names(_blocks(model)[0]) if n.startswith("self_attn.")]


def apply_lora(model, keys: list[str], rank: int, scale: float, dropout: float,
               num_layers: int | None = None):
    """PEFT LoRA equivalent to mlx-lm's: same modules (our keys, e.g. ``self_attn.o_proj``,
    are names inside a block; PEFT matches target_modules as name suffixes), same last
    ``num_layers`` blocks, and MLX's ``scale`` s -> PEFT ``lora_alpha = s * rank``."""
    blocks = _blocks(model)
    available = _block_linear_names(blocks[0])
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ValueError(f"keys {unknown} match no linear module; the blocks have: "
                         + ", ".join(available))
    n = len(blocks) if num_layers in (None, -1) else num_layers
    config = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=dropout,
                        target_modules=list(keys), bias="none", task_type="CAUSAL_LM",
                        layers_to_transform=list(range(len(blocks) - n, len(blocks))),
                        layers_pattern="layers")
    return get_peft_model(model, config)


def torch_lora_train_bench(model_dir, keys: list[str] | None = None, rank: int = 16,
                           scale: float = 20.0, dropout: float = 0.1, batch_size: int = 4,
                           seq_len: int = 256, steps: int = 5, warmup: int = 2,
                           grad_checkpoint: bool = False, threads: int | None = None,
                           num_layers: int | None = None, learning_rate: float = 1e-5,
                           seed: int = 0) -> dict:
    """Time LoRA training steps (forward, backward, Adam step) on random token batches of
    ``batch_size x seq_len`` with the causal LM loss on all tokens; the median of ``steps``
    timed steps after ``warmup`` untimed ones."""
    _require_torch()
    info = _set_threads(threads)
    info["matmul_gflops"] = matmul_gflops()
    torch.manual_seed(seed)
    model, loaded = load_model(model_dir)
    model.config.use_cache = False
    keys = list(keys) if keys else default_keys(model)
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, keys, rank, scale, dropout, num_layers)
    model.train()
    trainable, total = model.get_nb_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    times, losses = [], []
    for step in range(warmup + steps):
        tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss  # shifted inside: next-token loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step >= warmup:
            times.append(elapsed)
            losses.append(loss.item())
    median = statistics.median(times)
    return {
        "framework": "torch+peft", "model": str(model_dir), "weights_loaded": loaded,
        "model_type": model.config.model_type, "keys": keys, "rank": rank, "scale": scale,
        "lora_alpha": scale * rank, "dropout": dropout, "batch_size": batch_size,
        "seq_len": seq_len, "steps": steps, "warmup": warmup,
        "grad_checkpoint": grad_checkpoint, "attn_implementation": model.config._attn_implementation,
        "seconds_per_step": median, "step_times": times,
        "tokens_per_s": batch_size * seq_len / median, "last_loss": losses[-1],
        "peak_rss_gb": _peak_rss_gb(), "trainable_params": trainable, "total_params": total,
        **info,
    }


def torch_generation_bench(model_dir, batch_size: int = 4, prompt_len: int = 64,
                           new_tokens: int = 32, threads: int | None = None,
                           seed: int = 0) -> dict:
    """Greedy generation with the KV cache on random prompts, exactly ``new_tokens`` per
    sequence (min_new_tokens = max_new_tokens), at batch 1 and at ``batch_size``."""
    _require_torch()
    info = _set_threads(threads)
    info["matmul_gflops"] = matmul_gflops()
    model, loaded = load_model(model_dir)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    def run(batch: int, count: int) -> float:
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=count, min_new_tokens=count,
                                 use_cache=True, pad_token_id=0)
        elapsed = time.perf_counter() - start
        assert out.shape == (batch, prompt_len + count), out.shape
        return elapsed

    result = {"framework": "torch", "model": str(model_dir), "weights_loaded": loaded,
              "prompt_len": prompt_len, "new_tokens": new_tokens}
    for name, batch in (("batch_1", 1), (f"batch_{batch_size}", batch_size)):
        run(batch, 4)  # warm-up at this batch size, as MLX's side
        seconds = run(batch, new_tokens)
        result[name] = {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}
    return {**result, "peak_rss_gb": _peak_rss_gb(), **info}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--keys", nargs="+", default=None,
                    help="linear modules inside a block (default: the self_attn projections)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale", type=float, default=20.0, help="MLX LoRA scale (alpha = scale*rank)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--num-layers", type=int, default=-1, help="adapt the last N blocks; -1 = all")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--generate", action="store_true", help="benchmark generation instead")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if torch is None:
        print(f"voicetune.bench.torch_peft needs torch and peft ({_IMPORT_ERROR}); install them "
              f"with: {INSTALL_HINT}", file=sys.stderr)
        sys.exit(MISSING_EXIT_CODE)
    if args.generate:
        result = torch_generation_bench(args.model, args.batch, args.prompt_len,
                                        args.new_tokens, args.threads)
    else:
        result = torch_lora_train_bench(
            args.model, args.keys, args.rank, args.scale, args.dropout, args.batch,
            args.seq_len, args.steps, args.warmup, args.grad_checkpoint, args.threads,
            args.num_layers)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
