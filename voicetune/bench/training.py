"""Benchmark: MLX LoRA training and generation on this machine, with and without the x86
fast path (voicetune.core.kernels), side by side with PyTorch + PEFT on the same models, against
the ceiling set by the machine's best measured matmul rate.

    python -m voicetune.tools.bench [--out metrics/bench.json] [--steps 5] [--warmup 2] [--repeats 2]
        [--sections train generate kernels profile] [--models smollm2-135m phi3-random-512x8]

Two models: the embedded SmolLM2-135M-Instruct (models/base, converted if missing) and a
random-weight Phi-3-architecture model (hidden 512, 8 layers, 8 heads, FFN 1536, Phi-3's
32,064-token vocabulary). Every configuration runs in its own process (clean peak memory), in
the order MLX stock, MLX fast, PyTorch, ``--repeats`` times, so that the machine's drift hits
all three alike; the tables show medians, and ratios are medians of the per-repeat ratios.
PyTorch + PEFT is skipped, with a note, when the `bench` extra (torch, peft) is missing.

Ceiling: a LoRA step on a frozen base costs, per trained token, 2 FLOPs per base weight
forward and 2 backward (input gradients; the frozen weights get none), plus the attention
products and the small adapters; divided into the float32 matmul rate that gives the tokens/s
no implementation can beat. The rate is the best of many probes: one in this process before
each configuration's runs, and one at the start of every worker (MLX and PyTorch alike), so a
probe that ran while the machine was busy cannot lower it. efficiency = measured / ceiling;
an efficiency above 100% means the probes under-read, and the bench says so instead of
printing it.

Also: a kernels table (MLX's built-in ops against the fast path's, paired in one process) and
the profile of one SmolLM2 training step (forward, forward+backward and the step with the
fast path off and on; per-op times scaled by their count in a step, against the step).

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
from typing import Callable, NamedTuple

from voicetune.core import blas
from voicetune.models.memory import linear_shapes
from voicetune.core.files import write_json_atomic

TORCH_MISSING = 3  # bench_torch's exit code when torch/peft are not installed
PHI3_BENCH = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1536)
KEYS = {"llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "phi3": ["self_attn.qkv_proj", "self_attn.o_proj"]}
MODELS = ("smollm2-135m", "phi3-random-512x8")
SECTIONS = ("train", "generate", "kernels", "profile")
# The three contenders, in the order each repeat runs them; the MLX ones by fast-path setting
FRAMEWORKS = ("mlx_stock", "mlx_fast", "torch")
FASTPATH = {"mlx_stock": "off", "mlx_fast": "on"}
LORA_DROPOUT = 0.1


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
    return max(2 * n**3 / _seconds(lambda: a @ a) / 1e9 for _ in range(repeats))


def _seconds(fn) -> float:
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


# ---------------------------------------------------------------- workers (one per process)
def _swappable() -> dict[str, object]:
    """The mlx-lm functions the fast path may replace, as they are now."""
    import mlx.nn as nn
    from mlx_lm.models import llama, phi3

    names = {"llama.swiglu": (llama, "swiglu"), "phi3.swiglu": (phi3, "swiglu"),
             "llama.scaled_dot_product_attention": (llama, "scaled_dot_product_attention"),
             "nn.Dropout.__call__": (nn.Dropout, "__call__"),
             "nn.losses.cross_entropy": (nn.losses, "cross_entropy")}
    return {k: getattr(owner, attr, None) for k, (owner, attr) in names.items()}


def _swapped(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if after[k] is not before[k])


def _enable_fastpath(setting: str) -> dict:
    """Switch the fast path on or off for this worker process, before any model is built;
    what it swapped into mlx-lm is recorded (compared by identity, before and after)."""
    from voicetune.core import kernels as fastpath

    before = _swappable()
    active = fastpath.enable(setting)
    return {"fastpath": setting, "fastpath_active": bool(active),
            "fastpath_swapped": _swapped(before, _swappable())}


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
    from voicetune.train.sft import Batch, make_step, target_index

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


# ---------------------------------------------------------------- kernels: built-in vs fast
class Kernel(NamedTuple):
    name: str
    shape: str
    inputs: Callable[[], list]  # builds the arguments (arrays)
    builtin: Callable
    fast: Callable | None       # None: no fast version (timed for the profile only)
    grad: tuple[int, ...]       # the arguments differentiated; () = forward only


def kernels(fp, batch: int, seq: int, heads: int, head_dim: int, hidden: int, ffn: int,
            vocab: int, vocab_rows: int, dropout: float = LORA_DROPOUT) -> dict[str, Kernel]:
    """The ops the fast path replaces (and, without a fast version, the other elementwise
    ops of a layer), at the shapes of a batch of ``batch`` x ``seq`` tokens."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.activations import swiglu

    def normal(*shape):
        return lambda: [mx.random.normal(shape)]

    scale = head_dim ** -0.5
    scores, mlp, qkv = (batch, heads, seq, seq), (batch, seq, ffn), (batch, heads, seq, head_dim)
    dims = lambda s: "x".join(map(str, s))  # noqa: E731
    logits = lambda: [mx.random.normal((vocab_rows, vocab)),  # noqa: E731
                      mx.random.randint(0, vocab, (vocab_rows,))]
    masked = (batch, seq, hidden)
    items = [
        Kernel("exp", f"{batch * heads * seq * seq:,}", normal(batch * heads * seq * seq),
               mx.exp, fp.exp, (0,)),
        Kernel(f"softmax, rows of {seq}", dims(scores), normal(*scores),
               lambda x: mx.softmax(x, axis=-1), lambda x: fp.softmax(x, axis=-1), (0,)),
        Kernel(f"softmax, rows of {vocab:,}", dims((vocab_rows, vocab)), normal(vocab_rows, vocab),
               lambda x: mx.softmax(x, axis=-1), lambda x: fp.softmax(x, axis=-1), (0,)),
        Kernel("cross-entropy (loss)", dims((vocab_rows, vocab)), logits,
               nn.losses.cross_entropy, getattr(fp, "cross_entropy", None), (0,)),
        Kernel("sigmoid", dims(mlp), normal(*mlp), mx.sigmoid, fp.sigmoid, (0,)),
        Kernel("SiLU", dims(mlp), normal(*mlp), nn.silu, fp.silu, (0,)),
        Kernel("SwiGLU (MLP)", f"2 x {dims(mlp)}", lambda: [mx.random.normal(mlp), mx.random.normal(mlp)],
               swiglu, fp.swiglu, (0, 1)),
        Kernel("attention, causal", f"3 x {dims(qkv)}", lambda: [mx.random.normal(qkv) for _ in range(3)],
               lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
               lambda q, k, v: fp.attention(q, k, v, scale, "causal"), (0, 1, 2)),
        Kernel(f"dropout mask p={dropout}", dims(masked), lambda: [],
               lambda: mx.random.bernoulli(1 - dropout, masked),
               lambda: fp.dropout_mask(masked, 1 - dropout), ()),
        Kernel("RMSNorm", dims(masked), lambda: [mx.random.normal(masked), mx.ones((hidden,))],
               lambda x, w: mx.fast.rms_norm(x, w, 1e-5), None, (0,)),
        Kernel("RoPE", dims(qkv), normal(*qkv),
               lambda x: mx.fast.rope(x, head_dim, traditional=False, base=10000.0, scale=1.0,
                                      offset=0), None, (0,)),
    ]
    return {k.name: k for k in items}


def _forward_backward(fn: Callable, args: list, grad: tuple[int, ...]) -> Callable:
    """A function that evaluates ``fn(*args)`` and its VJP with respect to ``grad``."""
    import mlx.core as mx

    cotangent = mx.ones(fn(*args).shape)

    def partial_fn(*diff):
        full = list(args)
        for i, a in zip(grad, diff):
            full[i] = a
        return fn(*full)

    return lambda: mx.eval(mx.vjp(partial_fn, [args[i] for i in grad], [cotangent]))


def paired_medians(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up
    call each: paired, so that a busy moment of the machine hits them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def time_kernels(cases: dict[str, Kernel], repeats: int) -> list[dict]:
    """Per op: forward and forward+backward seconds of the built-in and the fast version
    (medians, paired), and the largest difference between their forward results."""
    import mlx.core as mx

    rows = []
    for case in cases.values():
        mx.random.seed(0)
        args = case.inputs()
        mx.eval(args)
        impls = {"builtin": case.builtin, **({"fast": case.fast} if case.fast else {})}
        row = {"op": case.name, "shape": case.shape}
        try:
            row["forward"] = paired_medians(
                {k: (lambda f=f: mx.eval(f(*args))) for k, f in impls.items()}, repeats)
            if case.grad:
                row["forward_backward"] = paired_medians(
                    {k: _forward_backward(f, args, case.grad) for k, f in impls.items()}, repeats)
            if case.fast and case.grad:  # same results (dropout masks are random draws)
                a, b = case.builtin(*args), case.fast(*args)
                row["max_abs_diff"] = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
        except Exception as err:  # a broken kernel is a row of the table, not the end of the run
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        del args
    return rows


def kernels_worker(repeats: int, batch: int = 4, seq: int = 192) -> dict:
    """The kernels table: the shapes of a SmolLM2 layer on a batch of 4 x 192 tokens (the
    real data's typical padded batch), and its 49,152-word vocabulary over those 768 rows."""
    from voicetune.core import kernels as fastpath

    # the allocator as the pipeline runs them (fastpath.enable tunes it): both columns alike
    fastpath.tune_allocator()
    cases = kernels(fastpath, batch=batch, seq=seq, heads=9, head_dim=64, hidden=576, ffn=1536,
                    vocab=49152, vocab_rows=batch * seq)
    cases = {name: case for name, case in cases.items() if case.fast is not None}
    return {"batch": batch, "seq_len": seq, "repeats": repeats, "ops": time_kernels(cases, repeats)}


# ---------------------------------------------------------------- the profile of a step
def step_op_counts(config: dict, keys: list[str]) -> dict[str, tuple[str, int]]:
    """How often each op runs in one LoRA training step (plain, no checkpointing) of a
    llama/phi3 model: {kernel name: ("forward" | "forward_backward", count)}."""
    layers = config["num_hidden_layers"]
    return {"attention, causal": ("forward_backward", layers),
            "SwiGLU (MLP)": ("forward_backward", layers),
            "cross-entropy (loss)": ("forward_backward", 1),
            f"dropout mask p={LORA_DROPOUT}": ("forward", layers * len(keys)),
            "RMSNorm": ("forward_backward", 2 * layers + 1),
            "RoPE": ("forward_backward", 2 * layers)}  # queries and keys


def profile_worker(model_dir: str, keys: list[str], batch: int, seq_len: int, rounds: int,
                   rank: int = 16, seed: int = 0) -> dict:
    """One training step of ``model_dir`` on ``batch`` x ``seq_len`` random tokens with the
    fast path off and on, alternately in this process (``fastpath.enabled``): the forward
    (loss) and the compiled step (the backward is the difference); then each op of the step,
    built-in and fast, timed at the step's shapes, with its count per step."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load

    from voicetune.core import kernels as fastpath
    from voicetune.models.lora import apply_lora
    from voicetune.train.sft import Batch, make_step, masked_loss, target_index

    gflops = mlx_matmul_probe()
    mx.random.seed(seed)
    model, _ = load(model_dir)
    model.set_dtype(mx.float32)
    apply_lora(model, rank, 20.0, LORA_DROPOUT, keys, -1)
    model.train()
    tokens = mx.array(np.random.default_rng(seed).integers(0, model.args.vocab_size,
                                                           (batch, seq_len + 1), dtype=np.int32))
    data = Batch(tokens, mx.array([[0, seq_len + 1]] * batch),
                 *target_index([0] * batch, [seq_len + 1] * batch, seq_len + 1))
    steps = {}
    for setting in ("off", "on"):  # one compiled step each, traced with its kernels
        with fastpath.enabled(setting):
            steps[setting] = make_step(model, optim.Adam(learning_rate=1e-5))

    def timed(setting: str, what: str) -> Callable:
        def run():
            with fastpath.enabled(setting):
                if what == "forward":
                    mx.eval(masked_loss(model, *data))
                else:
                    step, state = steps[setting]
                    mx.eval(state, step(*data))
        return run

    measured = {}
    # forward+backward uncompiled is the step less Adam's few LoRA parameters: not timed
    for what in ("forward", "step"):
        times = paired_medians({s: timed(s, what) for s in ("off", "on")}, rounds)
        measured[what] = {"stock": times["off"], "fast": times["on"]}

    config = model.args
    counts = step_op_counts({"num_hidden_layers": config.num_hidden_layers}, keys)
    before = _swappable()
    with fastpath.enabled("on"):
        swapped = _swapped(before, _swappable())
    cases = kernels(fastpath, batch=batch, seq=seq_len, heads=config.num_attention_heads,
                    head_dim=config.hidden_size // config.num_attention_heads,
                    hidden=config.hidden_size, ffn=config.intermediate_size,
                    vocab=config.vocab_size, vocab_rows=batch * seq_len)
    cases = {name: cases[name] for name in counts}
    ops = []
    for row in time_kernels(cases, rounds):
        how, count = counts[row["op"]]
        if "error" in row:  # left to the rest of the step
            ops.append({"op": row["op"], "shape": row["shape"], "count": count, "error": row["error"]})
            continue
        times = row[how]
        ops.append({"op": row["op"], "shape": row["shape"], "timed": how, "count": count,
                    "builtin_s": times["builtin"], "fast_s": times.get("fast")})
    return {"batch": batch, "seq_len": seq_len, "rounds": rounds, "matmul_gflops": gflops,
            "measured": measured, "ops": ops, "fastpath_swapped": swapped_kernels(swapped)}


def swapped_kernels(swapped: list[str]) -> list[str]:
    """The kernel names (see ``kernels``) of what ``fastpath.enable`` swapped into mlx-lm."""
    names = {"llama.swiglu": "SwiGLU (MLP)", "llama.scaled_dot_product_attention": "attention, causal",
             "nn.Dropout.__call__": f"dropout mask p={LORA_DROPOUT}",
             "nn.losses.cross_entropy": "cross-entropy (loss)"}
    return sorted(names[k] for k in swapped if k in names)


def profile_table(profile: dict, flops_per_token: float, gflops: float) -> dict:
    """Where the time of one step goes, stock and fast: each op's time x count (the fast
    time only where the fast path swaps that op in), the matmuls at the ceiling's rate,
    and the rest of the measured step (matmuls below peak rate, Adam, copies, glue)."""
    tokens = profile["batch"] * profile["seq_len"]
    rows = [{"op": "matmuls at the ceiling's rate", "count": None,
             "stock_s": flops_per_token * tokens / (gflops * 1e9),
             "fast_s": flops_per_token * tokens / (gflops * 1e9)}]
    for op in (op for op in profile["ops"] if "error" not in op):
        used = op["op"] in profile["fastpath_swapped"] and op["fast_s"] is not None
        rows.append({"op": op["op"], "count": op["count"], "timed": op["timed"],
                     "stock_s": op["count"] * op["builtin_s"],
                     "fast_s": op["count"] * (op["fast_s"] if used else op["builtin_s"]),
                     "fast_available_s": None if op["fast_s"] is None else op["count"] * op["fast_s"],
                     "swapped_in": used})
    step = profile["measured"]["step"]
    accounted = {k: sum(r[k] for r in rows) for k in ("stock_s", "fast_s")}
    rows.append({"op": "rest of the step (measured - above)", "count": None,
                 "stock_s": step["stock"] - accounted["stock_s"],
                 "fast_s": step["fast"] - accounted["fast_s"]})
    return {"rows": rows, "step": step}


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


def worker_command(framework: str, kind: str, model_dir: str | Path, options: list[str]) -> list[str]:
    """The command line of one worker process: ``framework`` one of FRAMEWORKS (the MLX ones
    with their fast-path flag), ``kind`` "train" or "generate"."""
    if framework == "torch":
        return [sys.executable, "-m", "voicetune.bench.torch_peft", "--model", str(model_dir),
                "--threads", str(os.cpu_count()), *(["--generate"] if kind == "generate" else []),
                *options]
    return [sys.executable, "-m", "voicetune.tools.bench", "--worker", kind, "--fastpath",
            FASTPATH[framework], "--model", str(model_dir), *options]


def prepare_models(workdir: Path, names=MODELS) -> dict[str, Path]:
    from voicetune.models.base_model import materialize
    from voicetune.fixtures.phi3_vocab import phi3_vocab_path
    from voicetune.fixtures.random_model import make_random_phi3

    models = {}
    if "smollm2-135m" in names:
        smol = Path("models/base")
        if not (smol / "config.json").exists():  # before the first `make repro`
            smol = workdir / "smollm2"
            smol.mkdir()
            materialize("embedded:smollm2-135m-instruct", None, smol)
        models["smollm2-135m"] = smol
    if "phi3-random-512x8" in names:
        models["phi3-random-512x8"] = Path(make_random_phi3(workdir / "phi3-bench", phi3_vocab_path(),
                                                            **PHI3_BENCH))
    return models


def run_interleaved(label: str, commands: dict[str, list[str]], repeats: int, probes: list[dict],
                    notes: list[str]) -> dict[str, list[dict]]:
    """Each framework's worker ``repeats`` times, in the order of ``commands`` each time;
    every worker's matmul probe joins ``probes``."""
    runs = {fw: [] for fw in commands}
    for r in range(repeats):
        for fw, cmd in commands.items():
            print(f"[bench] {label}, run {r + 1}/{repeats}: {fw}", flush=True)
            result, why = _run_json(cmd)
            if result is None:
                if why not in notes:
                    notes.append(why)
                continue
            runs[fw].append(result)
            if "matmul_gflops" in result:
                probes.append({"where": f"{fw} worker, {label}, run {r + 1}",
                               "gflops": result["matmul_gflops"]})
    return runs


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
    ap.add_argument("--kernel-repeats", type=int, default=5, help="paired timings per kernel")
    ap.add_argument("--profile-rounds", type=int, default=3, help="paired timings in the profile")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--worker", choices=["train", "generate", "kernels", "profile"], help=argparse.SUPPRESS)
    ap.add_argument("--fastpath", choices=["on", "off"], default="off", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--keys", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    blas.check()  # the loud warning when MLX runs on the reference BLAS
    probes = [{"where": "start, this process", "gflops": mlx_matmul_probe()},
              {"where": "start, numpy", "gflops": numpy_matmul_probe()}]
    notes: list[str] = []
    common = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    gen = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    report = {"machine": {"cpus": os.cpu_count(), "openblas": shown_path(blas.loaded),
                          **blas.describe(),
                          **elementwise_rates()},
              "settings": {k: getattr(args, k) for k in ("batch", "seq_len", "steps", "warmup",
                                                        "repeats", "gen_batch", "prompt_len",
                                                        "new_tokens", "kernel_repeats",
                                                        "profile_rounds")},
              "models": {}}
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = prepare_models(Path(tmp), args.models)
        for name, model_dir in models.items():
            config = json.loads((model_dir / "config.json").read_text())
            keys = KEYS[config["model_type"]]
            raw[name] = {"train": {}, "generate": None}
            entry = {"config": {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                        "num_attention_heads", "intermediate_size",
                                                        "vocab_size")},
                     "lora_keys": keys, "flops_per_token": training_flops_per_token(config, keys, 16,
                                                                                     args.seq_len)}
            report["models"][name] = entry
            if "train" in args.sections:
                for ckpt in (False, True):
                    label = "grad_checkpoint" if ckpt else "plain"
                    flag = ["--grad-checkpoint"] if ckpt else []
                    probes.append({"where": f"this process, before {name} {label}",
                                   "gflops": mlx_matmul_probe()})
                    commands = {fw: worker_command(fw, "train", model_dir, ["--keys", *keys, *common, *flag])
                                for fw in FRAMEWORKS}
                    raw[name]["train"][label] = run_interleaved(f"{name} train {label}", commands,
                                                                args.repeats, probes, notes)
            if "generate" in args.sections:
                probes.append({"where": f"this process, before {name} generation",
                               "gflops": mlx_matmul_probe()})
                options = {"torch": ["--batch", str(args.gen_batch), *gen]}
                commands = {fw: worker_command(fw, "generate", model_dir,
                                               options.get(fw, ["--gen-batch", str(args.gen_batch), *gen]))
                            for fw in FRAMEWORKS}
                raw[name]["generate"] = run_interleaved(f"{name} generation", commands, args.repeats,
                                                        probes, notes)
        if "kernels" in args.sections:
            print("[bench] kernels, built-in vs fast path", flush=True)
            report["kernels"] = _run_json([sys.executable, "-m", "voicetune.tools.bench", "--worker", "kernels",
                                           "--kernel-repeats", str(args.kernel_repeats)])[0]
        if "profile" in args.sections and "smollm2-135m" in models:
            print("[bench] profile of one SmolLM2 training step", flush=True)
            profile = _run_json([sys.executable, "-m", "voicetune.tools.bench", "--worker", "profile",
                                 "--model", str(models["smollm2-135m"]), "--keys", *KEYS["llama"],
                                 "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                                 "--profile-rounds", str(args.profile_rounds)])[0]
            probes.append({"where": "profile worker", "gflops": profile["matmul_gflops"]})
            report["profile"] = profile

    ceiling = best_probe(probes)
    report["ceiling"] = {"matmul_gflops": ceiling["gflops"], "best_probe": ceiling["where"],
                         "probes": probes}
    for name, entry in report["models"].items():
        entry["ceiling_tokens_per_s"] = ceiling["gflops"] * 1e9 / entry["flops_per_token"]
        bound = {"tokens_per_s": entry["ceiling_tokens_per_s"], "gflops": ceiling["gflops"],
                 "flops_per_token": entry["flops_per_token"]}
        entry["train"] = {mode: summarize_train(runs, bound, f"{name} {mode}", notes)
                          for mode, runs in raw[name]["train"].items()}
        if raw[name]["generate"]:
            entry["generate"] = summarize_generate(raw[name]["generate"], name)
    if "profile" in report:
        report["profile"]["table"] = profile_table(
            report["profile"], report["models"]["smollm2-135m"]["flops_per_token"], ceiling["gflops"])
    report["targets"] = targets(report)
    report["notes"] = notes
    write_json_atomic(args.out, report)
    print_report(report)
    print(f"wrote {args.out}")


def run_worker(args) -> dict:
    if args.worker == "train":
        return mlx_train_worker(args.model, args.keys, args.batch, args.seq_len, args.steps,
                                args.warmup, args.grad_checkpoint, fastpath=args.fastpath)
    if args.worker == "generate":
        return mlx_generate_worker(args.model, args.gen_batch, args.prompt_len, args.new_tokens,
                                   fastpath=args.fastpath)
    if args.worker == "kernels":
        return kernels_worker(args.kernel_repeats)
    return profile_worker(args.model, args.keys, args.batch, args.seq_len, args.profile_rounds)


def elementwise_rates() -> dict:
    """numpy's exp, for reference: what a vectorized exp does on this CPU."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal(4 * 9 * 192 * 192, dtype=np.float32)
    np.exp(x)
    return {"numpy_exp_melem_per_s": x.size / min(_seconds(lambda: np.exp(x)) for _ in range(7)) / 1e6}


# ---------------------------------------------------------------- summaries
def _ratio(runs: dict, a: str, b: str) -> float | None:
    """Median of the per-repeat ratios a/b of tokens/s (each repeat ran them back to back)."""
    pairs = list(zip(runs.get(a, []), runs.get(b, [])))
    if not pairs:
        return None
    return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs)


def summarize_train(runs: dict, ceiling: dict, label: str, notes: list[str]) -> dict:
    """Medians per framework, efficiency against ``ceiling`` (None, with the reason in
    ``notes``, where it would exceed 100%), and the ratios fast/torch, stock/torch,
    fast/stock."""
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
            "runs": [r["tokens_per_s"] for r in results],
        }
        try:
            out[framework]["efficiency"] = efficiency(tps, ceiling, f"{label} {framework}")
        except CeilingError as err:
            out[framework]["efficiency"] = None
            notes.append(str(err))
        if framework in FASTPATH:
            out[framework]["fastpath_active"] = all(r.get("fastpath_active", False) for r in results)
            out[framework]["fastpath_swapped"] = results[0].get("fastpath_swapped", [])
    for a, b in (("mlx_fast", "torch"), ("mlx_stock", "torch"), ("mlx_fast", "mlx_stock")):
        ratio = _ratio(runs, a, b)
        if ratio is not None:
            out[f"{a.removeprefix('mlx_')}_over_{b.removeprefix('mlx_')}"] = ratio
    return out


def summarize_generate(runs: dict, model_name: str) -> dict:
    """Per framework and batch size: median tokens/s and the runs; fast/torch per batch."""
    out = {}
    for framework, results in runs.items():
        if not results:
            continue
        sizes = [k for k in results[0] if k.startswith("batch_")]
        out[framework] = {size: {"tokens_per_s": statistics.median(r[size]["tokens_per_s"] for r in results),
                                 "runs": [r[size]["tokens_per_s"] for r in results]} for size in sizes}
        if framework in FASTPATH:
            out[framework]["fastpath_active"] = all(r.get("fastpath_active", False) for r in results)
        if framework == "torch":
            first = portable_result(results[0], model_name)
            out[framework].update({k: first[k] for k in ("torch", "threads", "omp_wait_policy") if k in first})
    for a, b in (("mlx_fast", "torch"), ("mlx_stock", "torch"), ("mlx_fast", "mlx_stock")):
        if runs.get(a) and runs.get(b):
            sizes = [k for k in runs[a][0] if k.startswith("batch_")]
            out[f"{a.removeprefix('mlx_')}_over_{b.removeprefix('mlx_')}"] = {
                size: statistics.median(x[size]["tokens_per_s"] / y[size]["tokens_per_s"]
                                        for x, y in zip(runs[a], runs[b])) for size in sizes}
    return out


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with its figure and whether it was met: training tokens/s
    >= PyTorch+PEFT (every model and mode), MLX's share of the ceiling >= PyTorch's, batched
    generation >= PyTorch at the largest batch."""
    out = []
    for name, entry in report["models"].items():
        for mode, res in entry.get("train", {}).items():
            if "fast_over_torch" in res:
                out.append({"target": "training tokens/s, MLX fast >= PyTorch+PEFT", "model": name,
                            "mode": mode, "value": res["fast_over_torch"],
                            "met": res["fast_over_torch"] >= 1.0})
            fast, torch = res.get("mlx_fast", {}).get("efficiency"), res.get("torch", {}).get("efficiency")
            if fast is not None and torch is not None:
                out.append({"target": "share of the ceiling, MLX fast >= PyTorch+PEFT", "model": name,
                            "mode": mode, "value": [fast, torch], "met": fast >= torch})
        gen = entry.get("generate", {}).get("fast_over_torch")
        if gen:
            size = max(gen, key=lambda k: int(k.split("_")[1]))
            out.append({"target": f"generation tokens/s at {size.replace('_', ' ')}, MLX fast >= PyTorch",
                        "model": name, "mode": size, "value": gen[size], "met": gen[size] >= 1.0})
    return out


# ---------------------------------------------------------------- printing
def _pct(value: float | None) -> str:
    return "refused" if value is None else f"{100 * value:.1f}%"


def print_report(report: dict) -> None:
    c, s = report["ceiling"], report["settings"]
    print(f"\nceiling: float32 matmul {c['matmul_gflops']:.0f} GFLOP/s, the best of {len(c['probes'])} "
          f"probes ({c['best_probe']}; lowest {min(p['gflops'] for p in c['probes']):.0f}); "
          f"{report['machine']['cpus']} CPUs; batch {s['batch']} x {s['seq_len']}, median of "
          f"{s['steps']} steps after {s['warmup']}, {s['repeats']} runs each")
    print_train_table(report)
    print_generate_table(report)
    if "kernels" in report:
        print_kernels_table(report["kernels"], report["machine"].get("numpy_exp_melem_per_s"))
    if "profile" in report:
        print_profile(report["profile"])
    if report.get("targets"):
        print("\ntargets:")
        for t in report["targets"]:
            value = (f"{100 * t['value'][0]:.1f}% vs {100 * t['value'][1]:.1f}%"
                     if isinstance(t["value"], list) else f"{t['value']:.2f}x")
            print(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['model']} {t['mode']}: {value}")
    for note in report.get("notes", []):
        print(f"NOTE: {note}")


def _tps(res: dict, fw: str) -> str:
    return f"{res[fw]['tokens_per_s']:.1f}" if fw in res else "-"


def print_train_table(report: dict) -> None:
    rows = [(name, mode, res) for name, entry in report["models"].items()
            for mode, res in entry.get("train", {}).items()]
    if not rows:
        return
    print(f"\n{'model':<18} {'mode':<15} {'ceiling':>7} {'stock':>7} {'fast':>7} {'torch':>7} "
          f"{'fast/torch':>10} {'fast/stock':>10} {'eff stock':>9} {'eff fast':>9} {'eff torch':>9} "
          f"{'peak GB stock/fast/torch':>24}")
    for name, mode, res in rows:
        ceiling = report["models"][name]["ceiling_tokens_per_s"]
        peaks = "/".join(f"{res[fw]['peak_memory_gb']:.2f}" if fw in res else "-" for fw in FRAMEWORKS)
        ratio = lambda k: f"{res[k]:.2f}" if k in res else "-"  # noqa: E731
        eff = lambda fw: _pct(res[fw]["efficiency"]) if fw in res else "-"  # noqa: E731
        print(f"{name:<18} {mode:<15} {ceiling:7.0f} {_tps(res, 'mlx_stock'):>7} {_tps(res, 'mlx_fast'):>7} "
              f"{_tps(res, 'torch'):>7} {ratio('fast_over_torch'):>10} {ratio('fast_over_stock'):>10} "
              f"{eff('mlx_stock'):>9} {eff('mlx_fast'):>9} {eff('torch'):>9} {peaks:>24}")
        if "mlx_fast" in res and not res["mlx_fast"].get("fastpath_active", True):
            print(f"  WARNING: the fast path was not active in the {name} {mode} fast runs")
    print("(tokens/s; ceiling = matmul rate / useful FLOPs per token; eff = tokens/s / ceiling)")


def print_generate_table(report: dict) -> None:
    rows = [(name, entry["generate"]) for name, entry in report["models"].items() if entry.get("generate")]
    if not rows:
        return
    print(f"\n{'generation':<18} {'batch':>5} {'stock':>7} {'fast':>7} {'torch':>7} {'fast/torch':>10} "
          f"{'fast/stock':>10}")
    for name, gen in rows:
        any_fw = next(fw for fw in FRAMEWORKS if fw in gen)
        for size in (k for k in gen[any_fw] if k.startswith("batch_")):
            cell = lambda fw: f"{gen[fw][size]['tokens_per_s']:.1f}" if fw in gen else "-"  # noqa: E731
            ratio = lambda k: f"{gen[k][size]:.2f}" if k in gen else "-"  # noqa: E731
            print(f"{name:<18} {size.split('_')[1]:>5} {cell('mlx_stock'):>7} {cell('mlx_fast'):>7} "
                  f"{cell('torch'):>7} {ratio('fast_over_torch'):>10} {ratio('fast_over_stock'):>10}")
    print("(greedy, KV cache, tokens/s including the prefill)")


def print_kernels_table(k: dict, numpy_exp: float | None = None) -> None:
    print(f"\nkernels (ms, median of {k['repeats']} paired runs; SmolLM2 shapes, batch {k['batch']} x "
          f"{k['seq_len']}; f+b = forward and backward)")
    print(f"{'op':<24} {'shape':<22} {'fwd MLX':>8} {'fwd fast':>8} {'x':>6} {'f+b MLX':>8} "
          f"{'f+b fast':>8} {'x':>6} {'max |diff|':>10}")
    for r in k["ops"]:
        if "error" in r:
            print(f"{r['op']:<24} {r['shape']:<22} ERROR {r['error']}")
            continue
        f, fb = r["forward"], r.get("forward_backward", {})
        cells = []
        for t in (f, fb):
            if "builtin" in t and "fast" in t:
                cells += [f"{1e3 * t['builtin']:.2f}", f"{1e3 * t['fast']:.2f}", f"{t['builtin'] / t['fast']:.1f}x"]
            else:
                cells += ["-", "-", "-"]
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"{r['op']:<24} {r['shape']:<22} {cells[0]:>8} {cells[1]:>8} {cells[2]:>6} {cells[3]:>8} "
              f"{cells[4]:>8} {cells[5]:>6} {diff:>10}")
    exp = next((r for r in k["ops"] if r["op"] == "exp" and "forward" in r), None)
    if numpy_exp and exp:
        size = int(exp["shape"].replace(",", ""))
        print(f"(numpy's exp of the same {size:,} floats: {1e3 * size / (numpy_exp * 1e6):.2f} ms)")


def print_profile(p: dict) -> None:
    m = p["measured"]
    print(f"\nprofile: one SmolLM2 LoRA step, batch {p['batch']} x {p['seq_len']} (s, median of "
          f"{p['rounds']} paired runs in one process; fast path swaps in: "
          f"{', '.join(p['fastpath_swapped']) or 'nothing'})")
    for what in (w for w in ("forward", "forward_backward", "step") if w in m):
        print(f"  {what.replace('_', '+'):<18} stock {m[what]['stock']:6.2f}   fast {m[what]['fast']:6.2f}   "
              f"speed-up {m[what]['stock'] / m[what]['fast']:.2f}x")
    if "forward" in m and "step" in m:
        back = {k: m["step"][k] - m["forward"][k] for k in ("stock", "fast")}
        print(f"  {'backward+update':<18} stock {back['stock']:6.2f}   fast {back['fast']:6.2f}   (step - forward)")
    for op in p["ops"]:
        if "error" in op:
            print(f"  {op['op']}: not timed ({op['error']})")
    if "table" not in p:
        return
    print(f"  {'where the step goes':<38} {'count':>5} {'stock s':>8} {'fast s':>8} {'fast kernel s':>13}")
    for r in p["table"]["rows"]:
        avail = r.get("fast_available_s")
        note = "" if avail is None or r.get("swapped_in") else " (not swapped in)"
        print(f"  {r['op']:<38} {r['count'] if r['count'] is not None else '':>5} {r['stock_s']:8.2f} "
              f"{r['fast_s']:8.2f} {'' if avail is None else f'{avail:.2f}':>13}{note}")
