"""Benchmark: MLX LoRA training and generation on this machine, side by side with
PyTorch + PEFT on the same models, against the ceiling set by the measured matmul rate.

    python -m voicetune.bench [--out metrics/bench.json] [--steps 5] [--warmup 2] [--repeats 2]

Two models: the embedded SmolLM2-135M-Instruct (models/base, converted if missing) and a
random-weight Phi-3-architecture model (hidden 512, 8 layers, 8 heads, FFN 1536, Phi-3's
32,064-token vocabulary). Every configuration runs in its own process (clean peak memory),
MLX and PyTorch alternately, ``--repeats`` times; the table shows medians. PyTorch + PEFT
is skipped, with a note, when the `bench` extra (torch, peft) is not installed.

Ceiling: a LoRA step on a frozen base costs, per trained token, 2 FLOPs per base weight
forward and 2 backward (input gradients; the frozen weights get none), plus the attention
products and the small adapters; divided into the measured float32 matmul rate that gives
the tokens/s no implementation can beat. efficiency = measured / ceiling.

The report is committed, so it names files without this machine's paths: relative to the
project, or by file name (``shown_path``), and models by their benchmark name.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import blas
from .estimate import linear_shapes
from .files import write_json_atomic

TORCH_MISSING = 3  # bench_torch's exit code when torch/peft are not installed
PHI3_BENCH = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1536)
KEYS = {"llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "phi3": ["self_attn.qkv_proj", "self_attn.o_proj"]}


# ---------------------------------------------------------------- FLOPs and ceiling
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


# ---------------------------------------------------------------- workers (one per process)
def mlx_train_worker(model_dir: str, keys: list[str], batch: int, seq_len: int, steps: int,
                     warmup: int, grad_checkpoint: bool, rank: int = 16, seed: int = 0) -> dict:
    """Median time of MLX LoRA steps (the pipeline's own compiled step) on random tokens,
    every position trained, as PyTorch's side does."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load

    from .lora import apply_lora
    from .training import Batch, make_step, target_index

    mx.random.seed(seed)
    model, _ = load(model_dir)
    model.set_dtype(mx.float32)
    apply_lora(model, rank, 20.0, 0.1, keys, -1)
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
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "last_loss": loss.item()}


def mlx_generate_worker(model_dir: str, batch: int, prompt_len: int, new_tokens: int,
                        seed: int = 0) -> dict:
    """Greedy generation with the KV cache on random prompts, exactly ``new_tokens`` each,
    at batch 1 and at ``batch``: tokens/s including the prefill."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

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

    run(1, 4)  # warm-up
    result = {}
    for name, size in (("batch_1", 1), (f"batch_{batch}", batch)):
        seconds = run(size, new_tokens)
        result[name] = {"seconds": seconds, "tokens_per_s": size * new_tokens / seconds}
    return result


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def elementwise_rates() -> dict:
    """numpy's matmul rate, and exp (the softmax and SiLU of every layer, the loss's softmax)
    in MLX and numpy: where MLX's CPU backend loses its time besides the matmuls."""
    import mlx.core as mx
    import numpy as np

    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    x = mx.random.normal((4 * 9 * 192 * 192,))  # one layer's attention scores, batch 4 x 192
    mx.eval(x)
    xn = np.array(x)
    return {
        "numpy_matmul_gflops": 2 * 1024**3 / _median_seconds(lambda: a @ a) / 1e9,
        "mlx_exp_melem_per_s": x.size / _median_seconds(lambda: mx.eval(mx.exp(x))) / 1e6,
        "numpy_exp_melem_per_s": x.size / _median_seconds(lambda: np.exp(xn)) / 1e6,
    }


# ---------------------------------------------------------------- orchestration
def shown_path(path: str | Path | None) -> str | None:
    """``path`` as a committed file may show it: relative to the working folder when inside
    it, else its file name alone (an absolute path says where one machine kept things)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


def portable_result(result: dict, model_name: str) -> dict:
    """A worker's result with its model folder (a temporary one, say) replaced by the
    benchmark's name for the model."""
    return {**result, "model": model_name} if "model" in result else result


def _run_json(cmd: list[str]) -> tuple[dict | None, str]:
    """Run a worker process; (its JSON line, or None, and why)."""
    # PyTorch's OpenMP threads spin while waiting: on a busy 2-core machine that made 2 threads
    # ~3x slower than 1. Passive waiting removes that artefact; MLX is unaffected.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == TORCH_MISSING:
        return None, "torch/peft not installed: pip install -e '.[bench]'"
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def prepare_models(workdir: Path) -> dict[str, Path]:
    from .base_model import materialize
    from .phi3_vocab import phi3_vocab_path
    from .random_model import make_random_phi3

    smol = Path("models/base")
    if not (smol / "config.json").exists():  # before the first `make repro`
        smol = workdir / "smollm2"
        smol.mkdir()
        materialize("embedded:smollm2-135m-instruct", None, smol)
    phi3 = make_random_phi3(workdir / "phi3-bench", phi3_vocab_path(), **PHI3_BENCH)
    return {"smollm2-135m": Path(smol), "phi3-random-512x8": Path(phi3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="metrics/bench.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--worker", choices=["train", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--keys", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker == "train":
        print(json.dumps(mlx_train_worker(args.model, args.keys, args.batch, args.seq_len,
                                          args.steps, args.warmup, args.grad_checkpoint)))
        return
    if args.worker == "generate":
        print(json.dumps(mlx_generate_worker(args.model, args.gen_batch, args.prompt_len,
                                             args.new_tokens)))
        return

    mlx_rate = blas.check()
    machine = {"cpus": os.cpu_count(), "mlx_matmul_gflops": mlx_rate, "openblas": shown_path(blas.loaded),
               **elementwise_rates()}
    common = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    report = {"machine": machine,
              "settings": {k: getattr(args, k) for k in ("batch", "seq_len", "steps", "warmup",
                                                        "repeats", "gen_batch", "prompt_len",
                                                        "new_tokens")},
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in prepare_models(Path(tmp)).items():
            config = json.loads((model_dir / "config.json").read_text())
            keys = KEYS[config["model_type"]]
            flops = training_flops_per_token(config, keys, 16, args.seq_len)
            entry = {"config": {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                        "num_attention_heads", "intermediate_size",
                                                        "vocab_size")},
                     "lora_keys": keys, "flops_per_token": flops,
                     "ceiling_tokens_per_s": mlx_rate * 1e9 / flops, "train": {}, "generate": {}}
            for ckpt in (False, True):
                label = "grad_checkpoint" if ckpt else "plain"
                flag = ["--grad-checkpoint"] if ckpt else []
                runs = {"mlx": [], "torch": []}
                for _ in range(args.repeats):
                    print(f"[bench] {name} train {label}: mlx", flush=True)
                    runs["mlx"].append(_run_json([sys.executable, "-m", "voicetune.bench", "--worker", "train",
                                                  "--model", str(model_dir), "--keys", *keys, *common, *flag])[0])
                    print(f"[bench] {name} train {label}: torch+peft", flush=True)
                    result, why = _run_json([sys.executable, "-m", "voicetune.bench_torch", "--model",
                                             str(model_dir), "--keys", *keys, "--threads", str(os.cpu_count()),
                                             *common, *flag])
                    if result is None:
                        entry["torch_skipped"] = why
                    else:
                        runs["torch"].append(result)
                entry["train"][label] = summarize_train(runs, entry["ceiling_tokens_per_s"])
            print(f"[bench] {name} generation", flush=True)
            gen = ["--model", str(model_dir), "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens)]
            entry["generate"]["mlx"] = _run_json([sys.executable, "-m", "voicetune.bench", "--worker",
                                                  "generate", "--gen-batch", str(args.gen_batch), *gen])[0]
            torch_gen, _ = _run_json([sys.executable, "-m", "voicetune.bench_torch", "--generate",
                                      "--batch", str(args.gen_batch), "--threads", str(os.cpu_count()),
                                      *gen])
            if torch_gen:
                entry["generate"]["torch"] = portable_result(torch_gen, name)
            report["models"][name] = entry
    write_json_atomic(args.out, report)
    print_table(report)
    print(f"wrote {args.out}")


def summarize_train(runs: dict, ceiling: float) -> dict:
    out = {}
    for framework, results in runs.items():
        if not results:
            continue
        tps = statistics.median(r["tokens_per_s"] for r in results)
        out[framework] = {
            "tokens_per_s": tps,
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
            "peak_memory_gb": statistics.median(r.get("peak_memory_gb", r.get("peak_rss_gb", 0))
                                                for r in results),
            "efficiency": tps / ceiling,
            "runs": [r["tokens_per_s"] for r in results],
        }
    if "torch" in out:
        # ratios per repeat (each pair ran back to back), then their median
        ratios = [m["tokens_per_s"] / t["tokens_per_s"] for m, t in zip(runs["mlx"], runs["torch"])]
        out["mlx_over_torch"] = statistics.median(ratios)
    return out


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\nmatmul float32: MLX {m['mlx_matmul_gflops']:.0f} GFLOP/s, numpy {m['numpy_matmul_gflops']:.0f} "
          f"GFLOP/s; exp: MLX {m['mlx_exp_melem_per_s']:.0f}, numpy {m['numpy_exp_melem_per_s']:.0f} "
          f"M/s; {m['cpus']} CPUs; batch {report['settings']['batch']} x {report['settings']['seq_len']}")
    print(f"{'model':<20} {'mode':<16} {'framework':<11} {'tok/s':>8} {'s/step':>7} {'peak GB':>8} "
          f"{'ceiling':>8} {'eff.':>6} {'MLX/torch':>9}")
    for name, entry in report["models"].items():
        for mode, res in entry["train"].items():
            for fw in ("mlx", "torch"):
                if fw not in res:
                    continue
                r = res[fw]
                ratio = f"{res['mlx_over_torch']:.2f}" if fw == "mlx" and "mlx_over_torch" in res else ""
                print(f"{name:<20} {mode:<16} {fw:<11} {r['tokens_per_s']:8.1f} {r['seconds_per_step']:7.2f} "
                      f"{r['peak_memory_gb']:8.2f} {entry['ceiling_tokens_per_s']:8.0f} "
                      f"{100 * r['efficiency']:5.1f}% {ratio:>9}")
        for fw, gen in entry["generate"].items():
            rates = ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in gen.items()
                              if isinstance(v, dict) and "tokens_per_s" in v)
            print(f"{name:<20} {'generate':<16} {fw:<11} {rates}")


if __name__ == "__main__":
    main()
