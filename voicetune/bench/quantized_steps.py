"""`python -m voicetune.bench.quantized_steps`: seconds per SFT training step of the base model
in float32 and quantized to 8 and 4 bits (QLoRA), side by side in one process.

Each configuration is the train stage's: the model loaded and cast as the stage does, quantized
in memory with mlx-lm (``model.quantize``'s function), params.yaml's LoRA, the stage's compiled
step and optimizer, and ``kernels.fast_cpu`` as params.yaml sets it; ``--stock`` adds the
quantized rows with MLX's own quantized matmul (the fast path's quantized layers off). Every
configuration steps on the same batch, the widest of the training split, in interleaved
rounds; the medians are printed, and each row's ratio to float32.

    python -m voicetune.bench.quantized_steps                  # 3 rounds
    python -m voicetune.bench.quantized_steps --rounds 5 --stock
"""
from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

from voicetune.core import kernels  # first: the package sets up a fast BLAS before mlx


def build(model_dir: str, params: dict, bits: int | None, group_size: int, batch):
    """A model adapted as the train stage adapts it, and its compiled training step."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import quantize_model

    from voicetune.models.lora import apply_lora
    from voicetune.train.loop import make_optimizer
    from voicetune.train.sft import make_step

    lora, train = params["lora"], params["train"]
    mx.random.seed(train["seed"])
    model, _, config = load(model_dir, return_config=True)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    if bits:
        model, _ = quantize_model(model, config, group_size, bits)
    apply_lora(model, lora["rank"], lora["scale"], lora["dropout"], lora["keys"], lora["num_layers"])
    optimizer = make_optimizer(train["optimizer"], train["learning_rate"])
    step, state = make_step(model, optimizer, train["grad_checkpoint"])
    model.train()

    def run() -> float:
        tic = time.perf_counter()
        loss, ntoks = step(*batch)
        mx.eval(state, loss, ntoks)
        return time.perf_counter() - tic

    run()  # compile and warm up
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/processed")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--stock", action="store_true",
                    help="also the quantized rows with MLX's own quantized matmul")
    args = ap.parse_args(argv)

    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

    from voicetune.core.params import load_params
    from voicetune.train.batching import collate
    from voicetune.train.sft import sample_batches

    params = load_params(args.params)
    fast = kernels.enable(params["kernels"]["fast_cpu"])
    _, tokenizer = load(args.model)
    train_set, _, _ = load_local_dataset(Path(args.data), tokenizer, types.SimpleNamespace(
        mask_prompt=params["train"]["mask_prompt"]))
    train_set = CacheDataset(train_set)
    widest = sample_batches(train_set, params["train"]["batch_size"])[-1]
    batch = collate(train_set, widest, params["train"]["max_seq_length"])
    print(f"batch {tuple(batch.tokens.shape)}, kernels.fast_cpu "
          f"{params['kernels']['fast_cpu']} ({'on' if fast else 'off'}); {args.rounds} rounds")

    configs = [("float32", None, True), ("8-bit", 8, True), ("4-bit", 4, True)]
    if args.stock:
        configs += [("8-bit, MLX's quantized matmul", 8, False),
                    ("4-bit, MLX's quantized matmul", 4, False)]
    runs = {}
    for name, bits, fast_quantized in configs:
        kernels.SWAP_QUANTIZED_MATMUL = fast_quantized
        kernels.disable()
        kernels.enable(params["kernels"]["fast_cpu"])
        runs[name] = build(args.model, params, bits, args.group_size, batch)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):  # each step was compiled with its own kernels, in build()
        for name, run in runs.items():
            times[name].append(run())
    base = statistics.median(times["float32"])
    print(f"{'configuration':34} {'s/step (median)':>16} {'vs float32':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:34} {median:16.2f} {median / base:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
