"""Fast CPU kernels for MLX on x86: exp and what is built on it, from MLX's fast primitives.

MLX's x86 CPU backend computes ``exp`` (and so sigmoid, SiLU, softmax) one float at a time
with library calls (docs/mlx-x86-transcendentals.md): ``mx.exp`` of 1.33 M floats ~15 ms on
this 2-core machine, an add 0.2 ms. Here exp is 2^n * e^r: n by the round-to-nearest "magic
number" add, r = x - n*ln2 (ln2 in two parts), e^r by a degree-7 Taylor polynomial, 2^n
written into the exponent bits with a shift and ``mx.view``. Only adds, multiplies, shifts
and a clip, which MLX runs vectorised; ``mx.compile`` fuses the runs between the views.
Relative error <= 1.1e-7 over the normal range (``mx.exp``'s own: 3.9e-6); overflow -> inf
(above 88.72, where ``mx.exp`` already gives inf above 88.0), underflow -> denormals, then 0
(below -103.3), -inf -> 0, NaN -> NaN.

Every kernel has its own VJP (``mx.custom_function``) from the analytic derivative: the
polynomial's autodiff would be wrong (``view`` has no gradient) and slower.

What ``enable()`` switches on, decided by ops and whole training steps measured side by
side in one process (interleaved, medians; the CPU was shared with three other jobs, so
ratios only; the scripts are in docs/mlx-x86-transcendentals.md):

- glibc allocator thresholds (``tune_allocator``): on. Without them every array of over
  ~1 M floats is fresh mmapped memory, and the kernels below, which make more passes over
  memory than MLX's, lose to MLX's (``exp`` of 1.33 M floats 0.7x); with them, per op:
  exp 3.3x forward / 1.7x forward+backward, sigmoid 6.8x / 2.4x, SiLU 4.1x / 1.9x.
- ``swiglu`` in mlx-lm's llama, phi3, qwen2 and mistral modules (the MLP): on. Per op at
  SmolLM2's shape (2 x 4x256x1536) 3.4x forward, 1.9x forward+backward; a whole SmolLM2
  LoRA step (4x256, first 8 of its 30 layers, allocator tuned in both) 1.05x (two paired
  rounds: 239.0 -> 226.4 s and 308.8 -> 294.9 s wall, at load average 5-7).
- attention (``attention``, in place of mlx-lm's ``scaled_dot_product_attention``): off.
  Exact (tests), but at 4x256, 9 query / 3 key-value heads it ran 0.93x forward and 0.66x
  forward+backward against MLX's SDPA, although its softmax alone is 2.2x / 1.5x: the
  score-matrix matmuls and the extra passes outweigh it. In a whole step (first
  4 layers) swapping it as well changed nothing measurable (53.9/52.3 against 53.2/52.4
  CPU seconds in two rounds), so it stays off.
- ``cross_entropy`` for the loss: off; 512 x 49,152 logits 0.59x forward, 0.26x with backward.
- ``dropout_mask`` for ``nn.Dropout``: off; bit-identical to ``mx.random.bernoulli`` but
  0.98x (drawing the bits is the cost, not the compare).
- quantized layers (``quantized_matmul``, for a quantized base: QLoRA): on. The weight
  dequantized and multiplied through BLAS instead of MLX's CPU quantized-matmul loop: 30x
  faster for a training batch, the same product to 3e-6 (see its comment).
- ``exp``, ``sigmoid``, ``silu``, ``softmax``: kernels for callers; mlx-lm's llama and phi3
  call them only through SwiGLU and SDPA.

Never on Metal or CUDA: ``resolve("auto")`` is True only for MLX's CPU device on x86-64.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import platform
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention as _ORIGINAL_SDPA


# ------------------------------------------------------------------------------ exp
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125        # ln 2 with its low mantissa bits zero: n * _LN2_HI is exact
_LN2_LO = 1.428606765330187e-06    # ln 2 - _LN2_HI
_ROUND = 12582912.0                # 1.5 * 2^23: x + _ROUND rounds x to an integer (|x| < 2^22)
_ROUND_BITS = 0x4B400000           # the bits of _ROUND as a float32
# Clip range: below -110 the result is 0 (the smallest denormal is e^-103.3); above 89 it is
# inf (the largest float32 is e^88.72); in between the two-factor scaling below is exact.
_LO, _HI = -110.0, 89.0
# Taylor coefficients 1/k! of e^r for |r| <= ln2/2: the truncation error is
# 0.347^8 / 8! = 5e-9, under float32's rounding.
_COEFFS = [1.0 / math.factorial(k) for k in range(8)]


def _exp2_int(n: mx.array) -> mx.array:
    """2.0 ** n for int32 n in [-126, 127]: the exponent field set directly."""
    return mx.view(mx.left_shift(n + 127, 23), mx.float32)


def _exp_math(x: mx.array) -> mx.array:
    x = mx.clip(x.astype(mx.float32), _LO, _HI)  # NaN stays NaN through clip, and below
    t = x * _LOG2E + _ROUND
    nf = t - _ROUND                                     # round(x / ln2) as a float
    n = mx.view(t, mx.int32) - _ROUND_BITS              # ... and as an int32
    r = (x - nf * _LN2_HI) - nf * _LN2_LO               # |r| <= ln2/2
    p = _COEFFS[-1]
    for c in reversed(_COEFFS[:-1]):                    # Horner
        p = p * r + c
    # 2^n in two factors: n runs from -159 to 129, beyond one float32 exponent field
    half = mx.right_shift(n, 1)
    return (p * _exp2_int(half)) * _exp2_int(n - half)


# not shapeless: MLX cannot infer the shape of a `view` in a shapeless graph
_exp_fwd = mx.compile(_exp_math)


def _first(primals):
    # A one-argument custom_function gets its argument bare, not in a tuple: primals[0]
    # would be the first row of a batch, silently (tests/core/test_kernels.py checks this).
    return primals[0] if isinstance(primals, (tuple, list)) else primals


@mx.custom_function
def _exp(x):
    return _exp_fwd(x)


@_exp.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


def exp(x: mx.array) -> mx.array:
    """``mx.exp`` for float32 (other float types are computed in float32 and cast back)."""
    _check_float(x, "exp")
    return _exp(x).astype(x.dtype)


def _check_float(x, name: str) -> None:
    if not isinstance(x, mx.array) or not mx.issubdtype(x.dtype, mx.floating):
        got = x.dtype if isinstance(x, mx.array) else type(x).__name__
        raise TypeError(f"fastpath.{name}: expected a floating-point mx.array, got {got}")


# ------------------------------------------------------------------------------ sigmoid, SiLU, SwiGLU
def _sigmoid_math(x):
    # exp(-x) = inf for x < -89 gives exactly 0, as it should
    return 1.0 / (1.0 + _exp_math(-x))


@mx.custom_function
def _sigmoid(x):
    return _sigmoid_fwd(x)


_sigmoid_fwd = mx.compile(_sigmoid_math)
_sigmoid_bwd = mx.compile(lambda g, s: g * (s * (1.0 - s)))


@_sigmoid.vjp
def _sigmoid_vjp(primals, cotangent, output):
    return _sigmoid_bwd(cotangent, output)


def sigmoid(x: mx.array) -> mx.array:
    """``mx.sigmoid``."""
    _check_float(x, "sigmoid")
    return _sigmoid(x).astype(x.dtype)


@partial(mx.compile)
def _silu_fwd(x):
    return x * _sigmoid_math(x)


@partial(mx.compile)
def _silu_bwd(g, x):
    s = _sigmoid_math(x)
    return g * (s * (1.0 + x * (1.0 - s)))


@mx.custom_function
def _silu(x):
    return _silu_fwd(x)


@_silu.vjp
def _silu_vjp(primals, cotangent, output):
    return _silu_bwd(cotangent, _first(primals))


def silu(x: mx.array) -> mx.array:
    """``nn.silu``: x * sigmoid(x)."""
    _check_float(x, "silu")
    return _silu(x).astype(x.dtype)


@partial(mx.compile)
def _swiglu_fwd(gate, x):
    return gate * _sigmoid_math(gate) * x


@partial(mx.compile)
def _swiglu_bwd(g, gate, x):
    s = _sigmoid_math(gate)
    silu_gate = gate * s
    return g * x * (s * (1.0 + gate * (1.0 - s))), g * silu_gate


@mx.custom_function
def _swiglu(gate, x):
    return _swiglu_fwd(gate, x)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    return _swiglu_bwd(cotangent, gate, x)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's ``swiglu``: silu(gate) * x (the MLP of Llama, Phi-3, Qwen2, Mistral)."""
    _check_float(gate, "swiglu")
    _check_float(x, "swiglu")
    return _swiglu(gate, x)


# ------------------------------------------------------------------------------ softmax
def _softmax_math(x, axis):
    x = x.astype(mx.float32)
    e = _exp_math(x - mx.max(x, axis=axis, keepdims=True))  # a row of -inf gives NaN, as MLX
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_bwd_math(g, y, axis):
    return y * (g - (g * y).sum(axis=axis, keepdims=True))


_softmax_kernels: dict = {}


def _softmax_kernel(axis: int):
    """A custom_function per axis (the axis is no array, so it cannot be a primal)."""
    if axis not in _softmax_kernels:
        fwd = mx.compile(partial(_softmax_math, axis=axis))
        bwd = mx.compile(partial(_softmax_bwd_math, axis=axis))

        @mx.custom_function
        def kernel(x):
            return fwd(x)

        @kernel.vjp
        def kernel_vjp(primals, cotangent, output):
            return bwd(cotangent, output)

        _softmax_kernels[axis] = kernel
    return _softmax_kernels[axis]


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """``mx.softmax(x, axis)`` over one axis (computed in float32, cast back)."""
    _check_float(x, "softmax")
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"fastpath.softmax: axis={axis!r} for an array of {x.ndim} dimensions")
    return _softmax_kernel(axis % x.ndim - x.ndim)(x).astype(x.dtype)


# ------------------------------------------------------------------------------ cross-entropy
@partial(mx.compile)
def _logsumexp_fwd(logits):
    m = mx.max(logits, axis=-1, keepdims=True)
    return (m + mx.log(_exp_math(logits - m).sum(axis=-1, keepdims=True))).squeeze(-1)


@partial(mx.compile)
def _logsumexp_bwd(g, logits, lse):
    return g[..., None] * _exp_math(logits - lse[..., None])


@mx.custom_function
def _logsumexp(logits):
    return _logsumexp_fwd(logits)


@_logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    return _logsumexp_bwd(cotangent, _first(primals), output)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """``nn.losses.cross_entropy(logits, targets)`` (class indices, reduction "none")."""
    _check_float(logits, "cross_entropy")
    if targets.shape != logits.shape[:-1] or mx.issubdtype(targets.dtype, mx.floating):
        raise ValueError(f"fastpath.cross_entropy: targets must be integer class indices of "
                         f"shape {logits.shape[:-1]}, got {targets.dtype} {targets.shape}")
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return _logsumexp(logits.astype(mx.float32)) - picked


# ------------------------------------------------------------------------------ attention
def _causal(L: int, S: int) -> mx.array:
    # as MLX: query i (of the last L of S positions) sees keys 0 .. S - L + i
    return mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]


def _scores(q, k, scale, mask, n_rep):
    """(B, n_kv, n_rep * L, S) scores with the mask applied, and the grouped queries."""
    B, H, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    qg = (q * scale).reshape(B, n_kv, n_rep * L, D)  # GQA without repeating K and V
    s = (qg @ k.swapaxes(-1, -2)).reshape(B, n_kv, n_rep, L, S)
    if mask is not None:
        if mask.ndim >= 3:  # per head: (.., H, L, S) -> (.., n_kv, n_rep, L, S)
            mask = (mask[..., None, :, :] if mask.shape[-3] == 1
                    else mask.reshape(*mask.shape[:-3], n_kv, n_rep, *mask.shape[-2:]))
        if mask.dtype == mx.bool_:
            s = mx.where(mask, s, mx.finfo(s.dtype).min)  # as MLX: the lowest float, not -inf
        else:
            s = s + mask
    return s.reshape(B, n_kv, n_rep * L, S), qg


def _attention_fwd(q, k, v, mask, scale, n_rep):
    B, H, L, D = q.shape
    s, _ = _scores(q, k, scale, mask, n_rep)
    p = _softmax_math(s, -1).astype(v.dtype)
    return (p @ v).reshape(B, H, L, v.shape[-1])


def _attention_bwd(q, k, v, mask, d_out, out, scale, n_rep):
    B, H, L, D = q.shape
    n_kv = k.shape[1]
    s, qg = _scores(q, k, scale, mask, n_rep)
    p = _softmax_math(s, -1)  # recomputed (cheap now) rather than kept from the forward
    dog = d_out.reshape(B, n_kv, n_rep * L, -1)
    dv = p.swapaxes(-1, -2) @ dog
    dp = dog @ v.swapaxes(-1, -2)
    # softmax VJP; sum_j dP * P over a row equals dO . O, which is cheaper
    ds = p * (dp - (dog * out.reshape(dog.shape)).sum(-1, keepdims=True))
    dq = (ds @ k).reshape(B, H, L, D) * scale
    dk = ds.swapaxes(-1, -2) @ qg  # qg holds the scale already
    return dq, dk, dv


_attention_kernels: dict = {}


def _attention_kernel(scale: float, n_rep: int, masked: bool):
    key = (scale, n_rep, masked)
    if key not in _attention_kernels:
        if masked:
            fwd = mx.compile(partial(_attention_fwd, scale=scale, n_rep=n_rep))
            bwd = mx.compile(partial(_attention_bwd, scale=scale, n_rep=n_rep))

            @mx.custom_function
            def kernel(q, k, v, mask):
                return fwd(q, k, v, mask)

            @kernel.vjp
            def kernel_vjp(primals, cotangent, output):
                q, k, v, mask = primals
                return (*bwd(q, k, v, mask, cotangent, output), mx.zeros_like(mask))
        else:  # compiled functions take arrays only: no None mask
            fwd = mx.compile(lambda q, k, v: _attention_fwd(q, k, v, None, scale, n_rep))
            bwd = mx.compile(lambda q, k, v, d_out, out:
                             _attention_bwd(q, k, v, None, d_out, out, scale, n_rep))

            @mx.custom_function
            def kernel(q, k, v):
                return fwd(q, k, v)

            @kernel.vjp
            def kernel_vjp(primals, cotangent, output):
                q, k, v = primals
                return bwd(q, k, v, cotangent, output)
        _attention_kernels[key] = kernel
    return _attention_kernels[key]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)``: q (B, H, L, D),
    k and v (B, H_kv, S, D) with H a multiple of H_kv; mask None, "causal", or an additive
    or boolean array broadcastable to (B, H, L, S)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("fastpath.attention: q, k and v must be 4-D (batch, heads, length, dim)")
    H, n_kv = q.shape[1], k.shape[1]
    if n_kv == 0 or H % n_kv or v.shape[1] != n_kv or k.shape[2] != v.shape[2]:
        raise ValueError(f"fastpath.attention: {H} query heads do not group over {n_kv} key/value "
                         f"heads, or k {k.shape} and v {v.shape} disagree")
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"fastpath.attention: mask={mask!r}; use None, 'causal' or an array")
        mask = _causal(q.shape[2], k.shape[2])
    if mask is not None and not isinstance(mask, mx.array):
        raise ValueError(f"fastpath.attention: mask must be None, 'causal' or an mx.array, "
                         f"not {type(mask).__name__}")
    if mask is not None and mask.ndim == 4 and mask.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"fastpath.attention: mask {mask.shape} does not broadcast to batch "
                         f"{q.shape[0]}")
    if mask is not None and mask.ndim < 2:
        mask = mx.broadcast_to(mask, (q.shape[2], k.shape[2]))
    kernel = _attention_kernel(float(scale), H // n_kv, mask is not None)
    return kernel(q, k, v) if mask is None else kernel(q, k, v, mask)


# ------------------------------------------------------------------------------ dropout
_keep_thresholds: dict = {}


def _bernoulli_threshold(p: float) -> int:
    """The integer T with ``bits < T`` == ``mx.random.bernoulli(p)`` for every 32-bit draw.

    MLX's bernoulli compares float32(bits) < float32(p) * nextafter(2^32 - 1, inf) (mlx/
    random.cpp); float32(b) rises with b, so the draws kept are exactly b < T for the
    smallest b whose float32 reaches the threshold. Found by bisection, on the host."""
    threshold = np.float32(p) * np.nextafter(np.float32(2**32 - 1), np.float32(np.inf))
    lo, hi = 0, 2**32  # invariant: float32(lo - 1) < threshold (or lo = 0); float32(hi) >= it
    while lo < hi:
        mid = (lo + hi) // 2
        if np.float32(mid) < threshold:
            lo = mid + 1
        else:
            hi = mid
    return lo


def dropout_mask(shape, p: float, key: mx.array | None = None) -> mx.array:
    """A boolean keep-mask, True with probability ``p`` (the *keep* probability), bit-identical
    to ``mx.random.bernoulli(p, shape, key)`` and advancing MLX's default random stream the
    same way when ``key`` is None, from the raw random bits and one integer compare.

    It is no faster: generating the bits (threefry) is the cost, not bernoulli's float
    compare (measured: 3.03 ms against 2.93 ms for 4x256x576), so ``enable()`` leaves
    ``nn.Dropout`` alone. Kept because it is exact and documents how MLX draws its masks."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fastpath.dropout_mask: p={p} is not a probability in [0, 1]")
    shape = tuple(shape)
    size = math.prod(shape)
    if size % 2:  # MLX's only raw-bits function, split(key, n), draws pairs
        return mx.random.bernoulli(p, shape, key)
    if key is None:
        # the key the default stream hands the next draw (its split's second half), then a
        # zero-size draw to advance the stream exactly as bernoulli would have
        key = mx.random.split(mx.random.state[0])[1]
        mx.random.uniform(shape=(0,))
    if p not in _keep_thresholds:
        _keep_thresholds[p] = _bernoulli_threshold(p)
    threshold = _keep_thresholds[p]
    if threshold >= 2**32:
        return mx.ones(shape, mx.bool_)
    bits = mx.random.split(key, size // 2).reshape(shape)  # = the bits bernoulli draws
    return bits < mx.array(threshold, mx.uint32)




def _dropout_call(self, x):
    # nn.Dropout.__call__ with the mask above: the same mask, so the same results
    if self._p_1 == 1 or not self.training:
        return x
    mask = dropout_mask(x.shape, self._p_1)
    return (mask * x) * (1 / self._p_1)


# ------------------------------------------------------------------------------ quantized matmul
# MLX's CPU ``quantized_matmul`` unpacks and multiplies in a plain loop: on x86 a training
# batch's (1024 x 576) @ (576 x 1536) 4-bit product took 2.3 s against 77 ms for the float
# product through BLAS (30x). Dequantizing the weight (one pass over it) and multiplying
# through BLAS computes the same product (max difference 3e-6) in 73 ms; the float weight is
# a temporary of one layer, made again in the backward (``custom_function``), so the memory
# of a quantized base stays quantized. Below ~16 rows (decoding a few sequences) the plain
# loop wins: dequantizing every weight for one token costs more than the loop.
DEQUANTIZE_MIN_ROWS = 16


@lru_cache(maxsize=None)
def _dequantized_matmul(group_size: int, bits: int, mode: str):
    def weight(w, scales, biases):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ weight(w, scales, biases).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals  # the quantized weights are frozen: zero cotangents
        return (cotangent @ weight(w, scales, biases), mx.zeros_like(w), mx.zeros_like(scales),
                mx.zeros_like(biases))

    return matmul


def quantized_matmul(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a quantized layer's W (``nn.QuantizedLinear``, ``nn.QuantizedEmbedding``
    as a linear): dequantized through BLAS for batches of DEQUANTIZE_MIN_ROWS rows or more."""
    biases = layer.get("biases")
    if biases is None or x.size // x.shape[-1] < DEQUANTIZE_MIN_ROWS:
        return mx.quantized_matmul(x, layer["weight"], scales=layer["scales"], biases=biases,
                                   transpose=True, group_size=layer.group_size, bits=layer.bits,
                                   mode=layer.mode)
    return _dequantized_matmul(layer.group_size, layer.bits, layer.mode)(
        x, layer["weight"], layer["scales"], biases)


def _quantized_linear_call(self, x):
    x = quantized_matmul(self, x)
    return x + self["bias"] if "bias" in self else x


def _quantized_embedding_as_linear(self, x):
    return quantized_matmul(self, x)


# ------------------------------------------------------------------------------ switching
def resolve(setting: str) -> bool:
    """params.yaml's ``kernels.fast_cpu``: on, off, or auto (an x86-64 CPU, MLX on its CPU)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    if setting == "auto":
        return (mx.default_device() == mx.cpu
                and platform.machine().lower() in ("x86_64", "amd64"))
    raise ValueError(f"kernels.fast_cpu: got {setting!r}; expected auto, on or off")


# the mlx-lm architectures whose MLP calls ``swiglu`` and whose attention calls
# ``scaled_dot_product_attention`` by those names (Llama/SmolLM2 and Phi-3 are the project's)
ARCHITECTURES = ("llama", "phi3", "qwen2", "mistral")

# Switched on by enable(): only what won in a whole training step or in generation.
SWAP_SWIGLU = True
SWAP_ATTENTION = False
SWAP_DROPOUT = False
SWAP_QUANTIZED_MATMUL = True
TUNE_ALLOCATOR = True

_saved: list[tuple[object, str, object]] = []  # (owner, attribute, original) to restore
_allocator_tuned = False

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc only); True if set.

    By default glibc serves blocks over a dynamic threshold (~1 M floats here) with mmap
    and gives them back to the kernel when freed, so every large intermediate array costs
    fresh-page faults: an add on 1.33 M floats ran 5-8x slower than on 0.5 M, and the
    polynomial kernels, with more intermediates than MLX's, lost to ``mx.exp``. Thresholds
    of 32 MiB (glibc's maximum) for mmap and 1 GiB for trimming the heap remove that.
    Results are unchanged; the process keeps up to 1 GiB of freed memory for reuse.
    ``disable()`` leaves it set: glibc's dynamic threshold cannot be restored."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    _allocator_tuned = (mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
                        and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
    return _allocator_tuned


def _sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention`` with ``attention`` for the plain case."""
    if hasattr(cache, "bits") or sinks is not None:
        return _ORIGINAL_SDPA(queries, keys, values, cache, scale, mask, sinks)
    return attention(queries, keys, values, scale, mask)


def _swap(owner, name: str, new) -> None:
    _saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type)
                   else getattr(owner, name)))
    setattr(owner, name, new)


def enable(setting: str = "auto") -> bool:
    """Swap the winning kernels into mlx-lm if ``resolve(setting)``; return whether the fast
    path is active. Idempotent; ``disable()`` undoes it. Models built before or after alike
    use it: the names are looked up at each call."""
    if not resolve(setting):
        return active()
    if _saved:
        return True
    if TUNE_ALLOCATOR:
        tune_allocator()
    for arch in ARCHITECTURES:
        try:
            module = importlib.import_module(f"mlx_lm.models.{arch}")
        except ImportError:  # an mlx-lm without this architecture
            continue
        if SWAP_SWIGLU and hasattr(module, "swiglu"):
            _swap(module, "swiglu", swiglu)
        if SWAP_ATTENTION and hasattr(module, "scaled_dot_product_attention"):
            _swap(module, "scaled_dot_product_attention", _sdpa)
    if SWAP_DROPOUT:
        _swap(nn.Dropout, "__call__", _dropout_call)
    if SWAP_QUANTIZED_MATMUL:
        _swap(nn.QuantizedLinear, "__call__", _quantized_linear_call)
        _swap(nn.QuantizedEmbedding, "as_linear", _quantized_embedding_as_linear)
    return True


def disable() -> None:
    """Put back every original that ``enable`` replaced."""
    while _saved:
        owner, name, original = _saved.pop()
        setattr(owner, name, original)


def active() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def enabled(setting: str = "on"):
    """``with fastpath.enabled("on"): ...``: the fast path inside, the previous state after."""
    was_active = active()
    on = enable(setting)
    try:
        yield on
    finally:
        if not was_active:
            disable()


