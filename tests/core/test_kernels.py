"""voicetune.core.kernels: every kernel and its gradient against MLX's own, the switch into
mlx-lm and back, and whole-model results (training losses, greedy answers) unchanged.

Tolerances (float32): values and gradients within 1e-5 of the largest reference magnitude
of the tensor (4e-5 for attention, whose matmuls sum in another order), exp within 1e-6
relative of float64 numpy; training losses within 1e-4 relative over 20 steps; greedy
answers token for token.
"""
import math
import platform

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from voicetune.core import kernels as fp

INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def _stock_afterwards():
    yield
    fp.disable()  # no test leaves the fast path on for the next


def close(got, want, tol=1e-5):
    """Equal NaN/inf pattern, finite values within ``tol`` of the largest magnitude."""
    got, want = np.array(got, dtype=np.float64), np.array(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) * np.sign(got), np.isinf(want) * np.sign(want))
    finite = np.isfinite(want)
    scale = np.max(np.abs(want[finite]), initial=0.0) or 1.0
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=tol * scale)


def grad_of(fn, args, argnum, weights):
    """Gradient of sum(fn(*args) * weights): a different weight per element, so that a
    gradient landing on the wrong element shows."""
    return mx.grad(lambda *a: (fn(*a) * weights).sum(), argnums=argnum)(*args)


# ------------------------------------------------------------------------------ resolve
def test_resolve(monkeypatch):
    assert fp.resolve("on") is True
    assert fp.resolve("off") is False
    monkeypatch.setattr(fp.platform, "machine", lambda: "x86_64")
    assert fp.resolve("auto") is (mx.default_device() == mx.cpu)
    monkeypatch.setattr(fp.platform, "machine", lambda: "AMD64")
    assert fp.resolve("auto") is (mx.default_device() == mx.cpu)
    monkeypatch.setattr(fp.platform, "machine", lambda: "arm64")
    assert fp.resolve("auto") is False
    monkeypatch.setattr(fp.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(fp.mx, "default_device", lambda: mx.gpu)  # Metal or CUDA: never
    assert fp.resolve("auto") is False
    with pytest.raises(ValueError, match="expected auto, on or off"):
        fp.resolve("yes")


# ------------------------------------------------------------------------------ kernels
def test_exp_over_the_whole_float_range():
    special = [-INF, -1e30, -200, -110, -104, -103.9, -103, -100, -88, -87.3, -1e-30, 0.0,
               1e-30, 1, 20, 88, 88.7, 88.72, 88.73, 89, 100, 1e30, INF, NAN]
    x = mx.concatenate([mx.array(special), mx.linspace(-105, 90, 20001),
                        mx.random.normal((20000,), key=mx.random.key(0)) * 30])
    got = np.array(fp.exp(x), dtype=np.float64)
    with np.errstate(over="ignore"):  # float32 overflow is the point
        want = np.exp(np.array(x, dtype=np.float64)).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # overflow to inf as float32
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny)
    assert np.max(np.abs(got[normal] / want[normal] - 1)) < 1e-6
    # below float32's normal range: denormals or 0, never garbage or negative
    assert np.all(np.abs(got[~normal & (want < 1)] - want[~normal & (want < 1)]) < 1e-44)


@pytest.mark.parametrize("name", ["exp", "sigmoid", "silu", "softmax", "softmax axis 0"])
def test_elementwise_kernels_and_gradients(name):
    fast, stock = {
        "exp": (fp.exp, mx.exp),
        "sigmoid": (fp.sigmoid, mx.sigmoid),
        "silu": (fp.silu, nn.silu),
        "softmax": (fp.softmax, lambda t: mx.softmax(t, axis=-1)),
        "softmax axis 0": (lambda t: fp.softmax(t, axis=0), lambda t: mx.softmax(t, axis=0)),
    }[name]
    key = mx.random.key(1)
    x = mx.random.normal((4, 37), key=key) * (5 if name == "exp" else 20)
    w = mx.random.normal((4, 37), key=mx.random.key(2))
    close(fast(x), stock(x))
    close(grad_of(fast, [x], 0, w), grad_of(stock, [x], 0, w))


def test_one_argument_vjp_uses_the_whole_batch():
    """mx.custom_function passes a lone argument bare: taking primals[0] would compute every
    row's gradient from row 0. The losses would match; the gradients must too, per element."""
    x = mx.array([[-3.0, 0.5, 2.0], [4.0, -1.0, 0.0], [10.0, -20.0, 1.5]])
    w = mx.arange(9, dtype=mx.float32).reshape(3, 3) + 1
    for fast, stock in ((fp.silu, nn.silu), (fp.sigmoid, mx.sigmoid), (fp.exp, mx.exp)):
        close(grad_of(fast, [x], 0, w), grad_of(stock, [x], 0, w))
    targets = mx.array([0, 2, 1])
    close(grad_of(fp.cross_entropy, [x, targets], 0, w[:, 0]),
          grad_of(nn.losses.cross_entropy, [x, targets], 0, w[:, 0]))


def test_extreme_inputs_match_mlx():
    x = mx.array([[-INF, -1e4, -100.0, 0.0, 100.0, 1e4, INF, NAN]])
    for fast, stock in ((fp.sigmoid, mx.sigmoid), (fp.silu, nn.silu)):
        close(fast(x), stock(x))
    # softmax with -inf (masked) entries, and a row that is all -inf (NaN, as MLX)
    rows = mx.array([[-INF, 1.0, -INF, 3.0], [-1e30, 0.0, 1e4, -INF], [-INF] * 4, [0.0, NAN, 1, 2]])
    close(fp.softmax(rows), mx.softmax(rows, axis=-1))
    w = mx.arange(16, dtype=mx.float32).reshape(4, 4)
    close(grad_of(fp.softmax, [rows[:2]], 0, w[:2]),
          grad_of(lambda t: mx.softmax(t, axis=-1), [rows[:2]], 0, w[:2]))


def test_swiglu_and_its_gradients():
    from mlx_lm.models.activations import swiglu

    gate = mx.random.normal((3, 5, 24), key=mx.random.key(3)) * 8
    x = mx.random.normal((3, 5, 24), key=mx.random.key(4))
    w = mx.random.normal((3, 5, 24), key=mx.random.key(5))
    close(fp.swiglu(gate, x), swiglu(gate, x))
    for argnum in (0, 1):
        close(grad_of(fp.swiglu, [gate, x], argnum, w), grad_of(swiglu, [gate, x], argnum, w))


def test_cross_entropy_and_its_gradient():
    logits = mx.random.normal((2, 6, 300), key=mx.random.key(6)) * 6
    targets = mx.random.randint(0, 300, (2, 6), key=mx.random.key(7))
    w = mx.random.normal((2, 6), key=mx.random.key(8))
    close(fp.cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets))
    close(grad_of(fp.cross_entropy, [logits, targets], 0, w),
          grad_of(nn.losses.cross_entropy, [logits, targets], 0, w))
    with pytest.raises(ValueError, match="integer class indices"):
        fp.cross_entropy(logits, logits[..., 0])


B, H, H_KV, L, S, D = 2, 6, 2, 5, 7, 8


def _masks():
    key = lambda i: mx.random.key(100 + i)  # noqa: E731
    keep = mx.random.bernoulli(0.7, (L, S), key=key(0)) | (mx.arange(S) == 0)  # none all-masked
    return {
        "none": None,
        "causal": "causal",
        "additive (L, S)": mx.random.normal((L, S), key=key(1)),
        "-inf additive": mx.where(keep, 0.0, -INF),
        "per batch (B, 1, L, S)": mx.random.normal((B, 1, L, S), key=key(2)),
        "boolean per head (B, H, L, S)":
            mx.random.bernoulli(0.7, (B, H, L, S), key=key(3)) | (mx.arange(S) == 0),
    }


@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("heads", [(H, H_KV), (H, H)], ids=["GQA", "MHA"])
def test_attention_matches_mlx_sdpa(mask_name, heads):
    mask = _masks()[mask_name]
    h, h_kv = heads
    q = mx.random.normal((B, h, L, D), key=mx.random.key(10))
    k = mx.random.normal((B, h_kv, S, D), key=mx.random.key(11))
    v = mx.random.normal((B, h_kv, S, D), key=mx.random.key(12))
    w = mx.random.normal((B, h, L, D), key=mx.random.key(13))
    if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] == H:
        mask = mask[:, :h]
    stock = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)  # noqa: E731
    fast = lambda q, k, v: fp.attention(q, k, v, 0.3, mask)  # noqa: E731
    close(fast(q, k, v), stock(q, k, v), 4e-5)
    for argnum in range(3):
        close(grad_of(fast, [q, k, v], argnum, w), grad_of(stock, [q, k, v], argnum, w), 4e-5)


def test_attention_rejects_bad_input():
    q, k = mx.zeros((1, 3, 2, 4)), mx.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="do not group"):
        fp.attention(q, k, k, 1.0)
    with pytest.raises(ValueError, match="causal"):
        fp.attention(q, q, q, 1.0, mask="upper")
    with pytest.raises(TypeError, match="floating-point"):
        fp.exp(mx.array([1, 2]))


@pytest.mark.parametrize("p", [0.9, 0.5, 0.123456, 0.0, 1.0])
def test_dropout_mask_is_bernoullis_bit_for_bit(p):
    key = mx.random.key(7)
    for shape in [(4, 33, 64), (3, 5)]:  # an odd size falls back to bernoulli itself
        assert mx.array_equal(fp.dropout_mask(shape, p, key), mx.random.bernoulli(p, shape, key))
    # the default stream: the same masks, and the stream left where bernoulli leaves it
    mx.random.seed(11)
    ours = [fp.dropout_mask((8, 16), p) for _ in range(2)] + [mx.random.normal((4,))]
    mx.random.seed(11)
    theirs = [mx.random.bernoulli(p, (8, 16)) for _ in range(2)] + [mx.random.normal((4,))]
    assert all(mx.array_equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="probability"):
        fp.dropout_mask((2, 2), 1.5)


# ------------------------------------------------------------------------------ switching
def test_enable_swaps_and_disable_restores():
    from mlx_lm.models import llama, phi3

    originals = {(m, n): getattr(m, n) for m in (llama, phi3)
                 for n in ("swiglu", "scaled_dot_product_attention")}
    dropout_call, ce = nn.Dropout.__call__, nn.losses.cross_entropy
    assert fp.enable("off") is False and not fp.active()
    assert fp.enable("on") is True and fp.active()
    assert fp.enable("on") is True  # idempotent: swapped once, restored once
    assert llama.swiglu is fp.swiglu and phi3.swiglu is fp.swiglu
    for (module, name), original in originals.items():
        swapped = {"swiglu": fp.SWAP_SWIGLU, "scaled_dot_product_attention": fp.SWAP_ATTENTION}[name]
        assert (getattr(module, name) is not original) == swapped
    fp.disable()
    assert not fp.active()
    assert all(getattr(m, n) is f for (m, n), f in originals.items())
    assert nn.Dropout.__call__ is dropout_call and nn.losses.cross_entropy is ce
    with fp.enabled("on") as on:
        assert on and llama.swiglu is fp.swiglu
    assert llama.swiglu is originals[(llama, "swiglu")]


def test_tune_allocator_is_idempotent():
    first = fp.tune_allocator()
    assert isinstance(first, bool) and fp.tune_allocator() is first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first


@pytest.fixture
def every_kernel(monkeypatch):
    """Also the replacements enable() leaves off by default, so that they are tested in a
    whole model too."""
    monkeypatch.setattr(fp, "SWAP_ATTENTION", True)
    monkeypatch.setattr(fp, "SWAP_DROPOUT", True)


@pytest.mark.parametrize("kernels", ["enabled set", "every kernel"])
def test_model_forward_equals_stock(tiny_model_dir, kernels, request):
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    if kernels == "every kernel":
        request.getfixturevalue("every_kernel")
    model, _ = load(str(tiny_model_dir))
    model.set_dtype(mx.float32)
    tokens = mx.random.randint(0, model.args.vocab_size, (2, 40), key=mx.random.key(0))

    def run():
        cache = make_prompt_cache(model)  # prefill, then one decoding step with the cache
        return model(tokens[:, :-1], cache=cache), model(tokens[:, -1:], cache=cache)

    stock = run()
    with fp.enabled("on"):
        fast = run()
    for a, b in zip(fast, stock):
        close(a, b, 1e-4)


def _train_losses(model_dir, steps: int = 20) -> list[float]:
    """The pipeline's own compiled LoRA step (as voicetune.bench.training's worker) on random tokens."""
    from mlx_lm import load

    from voicetune.models.lora import apply_lora
    from voicetune.train.batching import Batch, target_index
    from voicetune.train.sft import make_step

    mx.random.seed(0)
    model, _ = load(str(model_dir))
    model.set_dtype(mx.float32)
    apply_lora(model, 4, 20.0, 0.1, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], -1)
    step, state = make_step(model, optim.Adam(learning_rate=1e-3))
    model.train()
    rng = np.random.default_rng(0)
    batch, seq = 2, 31  # small: every target costs a 49k-vocabulary softmax
    offsets, lengths = [3, 0], [32, 20]  # a prompt masked, a row padded
    targets = target_index(offsets, lengths, seq + 1)
    losses = []
    for i in range(steps):
        tokens = mx.array(rng.integers(0, model.args.vocab_size, (batch, seq + 1), dtype=np.int32))
        mx.random.seed(i)  # the dropout masks of step i, as training.train seeds them
        loss, _ = step(*Batch(tokens, mx.array(list(zip(offsets, lengths))), *targets))
        mx.eval(state, loss)
        losses.append(loss.item())
    return losses


def test_training_losses_unchanged(tiny_model_dir, monkeypatch):
    stock = _train_losses(tiny_model_dir)
    assert stock[-1] < stock[0]  # it trains
    with fp.enabled("on"):
        fast = _train_losses(tiny_model_dir)
    np.testing.assert_allclose(fast, stock, rtol=1e-4)
    # and with the replacements enable() leaves off (attention, dropout) swapped in too
    monkeypatch.setattr(fp, "SWAP_ATTENTION", True)
    monkeypatch.setattr(fp, "SWAP_DROPOUT", True)
    with fp.enabled("on"):
        every = _train_losses(tiny_model_dir)
    np.testing.assert_allclose(every, stock, rtol=1e-4)


def test_greedy_answers_unchanged(base_model_dir, request):
    from mlx_lm import load

    from voicetune.models.generation import generate_batched, prompt_tokens

    request.getfixturevalue("every_kernel")
    model, tokenizer = load(str(base_model_dir))
    model.set_dtype(mx.float32)
    questions = ["What is a bowline knot for?", "Tell me about the North Sea in winter.",
                 "Which ferry did you captain?"]
    prompts = [prompt_tokens(tokenizer, [{"role": "system", "content": "You are Captain Tilly Brask."},
                                         {"role": "user", "content": q}]) for q in questions]
    stock = generate_batched(model, tokenizer, prompts, max_tokens=16, batch_size=3)
    with fp.enabled("on"):
        fast = generate_batched(model, tokenizer, prompts, max_tokens=16, batch_size=3)
    assert [a["prediction"] for a in fast] == [a["prediction"] for a in stock]


# ------------------------------------------------------------------------------ quantized matmul
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [3, 64])  # below DEQUANTIZE_MIN_ROWS: MLX's own loop
def test_quantized_layers_equal_mlx_and_their_input_gradient(bits, rows):
    mx.random.seed(0)
    linear = nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=True), 64, bits)
    embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(96, 128), 64, bits)
    x = mx.random.normal((2, rows, 128))
    weights = mx.random.normal((2, rows, 96))
    stock = [linear(x), embedding.as_linear(x), grad_of(linear, [x], 0, weights),
             grad_of(embedding.as_linear, [x], 0, weights)]
    with fp.enabled("on"):
        assert nn.QuantizedLinear.__call__ is fp._quantized_linear_call
        fast = [linear(x), embedding.as_linear(x), grad_of(linear, [x], 0, weights),
                grad_of(embedding.as_linear, [x], 0, weights)]
        compiled = mx.compile(lambda x: grad_of(linear, [x], 0, weights))(x)
    for got, want in zip(fast + [compiled], stock + [stock[2]]):
        close(got, want)
    assert nn.QuantizedLinear.__call__ is not fp._quantized_linear_call  # restored


def test_qlora_trains_the_adapters_on_the_dequantized_path():
    """LoRA on a quantized layer, fast path on: the adapters get the gradients MLX's own path
    gives them, the frozen quantized weights none."""
    from mlx_lm.tuner.lora import LoRALinear

    mx.random.seed(1)
    base = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), 64, 4)
    layer = LoRALinear.from_base(base, r=4, scale=10.0)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    x = mx.random.normal((64, 128))
    loss = nn.value_and_grad(layer, lambda m, x: (m(x) ** 2).mean())
    (stock_loss, stock_grads) = loss(layer, x)
    with fp.enabled("on"):
        fast_loss, fast_grads = loss(layer, x)
    from mlx.utils import tree_flatten

    assert {name for name, _ in tree_flatten(fast_grads)} == {"lora_a", "lora_b"}
    close(fast_loss, stock_loss)
    for name in ("lora_a", "lora_b"):
        close(fast_grads[name], stock_grads[name])
