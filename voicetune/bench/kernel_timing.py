"""MLX's built-in ops against the fast path's, paired in one process (the kernels table), and
the profile of one training step: per-op times scaled by their count in a step."""
from __future__ import annotations

import statistics
from typing import Callable, NamedTuple

from voicetune.bench.ceiling import mlx_matmul_probe, seconds
from voicetune.bench.workers import LORA_DROPOUT, swappable, swapped_since


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
            times[name].append(seconds(fn))
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
    from voicetune.train.batching import Batch, target_index
    from voicetune.train.sft import make_step, masked_loss

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
    before = swappable()
    with fastpath.enabled("on"):
        swapped = swapped_since(before, swappable())
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
