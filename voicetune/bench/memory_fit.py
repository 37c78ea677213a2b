"""`python -m voicetune.bench.memory_fit`: the memory estimate (voicetune.models.memory) against
MLX's measured peak, per training configuration, on the real model and data.

Each configuration runs in its own subprocess (gradient checkpointing patches a layer class,
and MLX's caches outlive a run): the model is loaded as the train stage loads it (float32 on a
CPU), quantized in memory for the 4- and 8-bit rows (``mlx_lm.utils.quantize_model``, as
``model.quantize`` would have done to models/base), adapted with params.yaml's LoRA, and takes
real training steps (the stage's compiled step and optimizer) on the batches that set the
peak: the widest one (the longest samples) and the one with the most trained tokens. The peak
is ``mx.get_peak_memory()`` after those steps; ``weights`` is the active memory after loading.

    python -m voicetune.bench.memory_fit                     # the default table
    python -m voicetune.bench.memory_fit --json out.json     # also the rows as JSON
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

# (name, overrides of params.yaml's train section, quantize bits)
CONFIGS = [
    ("float32 batch 4", {"batch_size": 4}, None),
    ("float32 batch 4 checkpointed", {"batch_size": 4, "grad_checkpoint": True}, None),
    ("float32 batch 1", {"batch_size": 1}, None),
    ("float32 batch 8", {"batch_size": 8}, None),
    ("8-bit batch 4", {"batch_size": 4}, 8),
    ("4-bit batch 4", {"batch_size": 4}, 4),
]
STEPS = 2  # on the widest batch; one more on the batch with the most trained tokens


def measure(model_dir: str, data_dir: str, params_path: str, train_overrides: dict,
            quantize: int | None, group_size: int = 64) -> dict:
    """One configuration, in this process: the peak of a few real training steps."""
    from voicetune.core import kernels  # first: the package sets up a fast BLAS before mlx
    from voicetune.core.params import load_params
    from voicetune.models.lora import apply_lora
    from voicetune.train.batching import collate
    from voicetune.train.loop import make_optimizer
    from voicetune.train.sft import make_step, sample_batches

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.utils import quantize_model

    params = load_params(params_path)
    lora_p, train_p = params["lora"], {**params["train"], **train_overrides}
    kernels.enable(params["kernels"]["fast_cpu"])
    mx.random.seed(train_p["seed"])
    model, tokenizer = load(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    if quantize:
        model, config = quantize_model(model, config, group_size, quantize)
    mx.eval(model.parameters())
    weights_gb = mx.get_active_memory() / 1e9
    apply_lora(model, lora_p["rank"], lora_p["scale"], lora_p["dropout"], lora_p["keys"],
               lora_p["num_layers"])
    data_cfg = types.SimpleNamespace(mask_prompt=train_p["mask_prompt"])
    train_set = CacheDataset(load_local_dataset(Path(data_dir), tokenizer, data_cfg)[0])
    batches = sample_batches(train_set, train_p["batch_size"])
    items = [train_set[i] for i in range(len(train_set))]
    cap = train_p["max_seq_length"]

    def size(rows):  # (rows x longest, trained targets) of a batch, before collating
        return (len(rows) * min(cap, max(len(items[r][0]) for r in rows)),
                sum(max(0, min(len(items[r][0]), cap) - max(items[r][1], 1)) for r in rows))

    widest = max(range(len(batches)), key=lambda i: size(batches[i])[0])
    most = max(range(len(batches)), key=lambda i: size(batches[i])[1])
    collated = {i: collate(train_set, batches[i], cap) for i in {widest, most}}
    optimizer = make_optimizer(train_p["optimizer"], train_p["learning_rate"])
    model.train()
    step, state = make_step(model, optimizer, train_p["grad_checkpoint"])
    mx.reset_peak_memory()
    for i in [widest] * STEPS + ([most] if most != widest else []):
        loss, ntoks = step(*collated[i])
        mx.eval(state, loss, ntoks)
    return {"peak_gb": mx.get_peak_memory() / 1e9, "weights_gb": weights_gb,
            "resident_gb": mx.get_active_memory() / 1e9,
            "width": collated[widest].tokens.shape[1] - 1,
            "longest": max(len(t) for t, _ in items),
            "samples": [[len(t), o] for t, o in items],
            "quantization": config.get("quantization")}


def run_one(args, overrides: dict, quantize: int | None) -> dict:
    cmd = [sys.executable, "-m", "voicetune.bench.memory_fit", "--model", args.model,
           "--data", args.data, "--params", args.params,
           "--child", json.dumps({"train": overrides, "quantize": quantize})]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"memory_fit: {overrides} {quantize}-bit failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/processed")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--only", nargs="*", help="names of CONFIGS to run (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(args.model, args.data, args.params, job["train"],
                                 job["quantize"])))
        return 0

    from voicetune.core.params import load_params
    from voicetune.models import memory

    params = load_params(args.params)
    config = json.loads((Path(args.model) / "config.json").read_text())
    rows = []
    print(f"{'configuration':30} {'estimate':>9} {'measured':>9} {'est/meas':>8}  "
          f"{'weights est/meas':>17}")
    for name, overrides, bits in CONFIGS:
        if args.only and name not in args.only:
            continue
        got = run_one(args, overrides, bits)
        train = {**params["train"], **overrides}
        shape = memory.batch_shape(got["samples"], train["batch_size"], train["max_seq_length"])
        est = memory.memory_estimate(config, params["lora"], train, 4, seq_len=shape["width"],
                                     targets=shape["targets"], quantize=bits)
        row = {"name": name, "estimate_gb": round(est["total_gb"], 3),
               "measured_gb": round(got["peak_gb"], 3),
               "ratio": round(est["total_gb"] / got["peak_gb"], 3),
               "weights_estimate_gb": round(est["weights_gb"], 3),
               "weights_measured_gb": round(got["weights_gb"], 3),
               "width": shape["width"], "targets": shape["targets"]}
        rows.append(row)
        print(f"{name:30} {row['estimate_gb']:8.2f}G {row['measured_gb']:8.2f}G "
              f"{row['ratio']:8.2f}  {row['weights_estimate_gb']:7.3f}/{row['weights_measured_gb']:.3f} GB",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
