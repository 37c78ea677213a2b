"""Stage train: LoRA on models/base with data/processed -> models/adapters + metrics/train.json.

    python stages/train.py                 # reads params.yaml (lora, train sections)

Killed mid-run? Run it again (or `dvc repro`): it resumes from the last checkpoint in
models/.train-checkpoint and ends with the same best adapter as an uninterrupted run.

Outputs change only when a run succeeds, and then each at once (written aside, moved into
place): a failed or killed run leaves models/adapters, metrics/train.json and dvclive/train
as the last good run wrote them. Until then the best adapter and the DVCLive logs live in
the checkpoint folder.

Several machines (or processes): `make train-distributed HOSTS=hosts.json` runs this script
under `mlx.launch` (see voicetune/tools/distributed.py); rank 0 writes every output.
"""
import argparse
import io
import math
import sys
import types
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas
from voicetune.models import memory
from voicetune.core import kernels
from voicetune.core.code_hash import code_fingerprint
from voicetune.models.lora import apply_lora, parameter_counts
from voicetune.core.params import early_stopping_problem, load_params
from voicetune.train.checkpoint import Checkpoint
from voicetune.train.outputs import StagedOutputs
from voicetune.train.sft import TrainConfig, epochs_summary, resolve_iters, run_fingerprint, train

import mlx.core as mx  # noqa: E402  (after voicetune, which sets up a fast BLAS first)
from mlx_lm import load  # noqa: E402
from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

# recorded in metrics/train.json and the checkpoint's history, but constant: not plotted
NOT_PLOTTED = {"step", "val_samples", "val_tokens"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/processed")
    ap.add_argument("--out", default="models/adapters")
    ap.add_argument("--metrics", default="metrics/train.json")
    ap.add_argument("--live-dir", default="dvclive/train")
    ap.add_argument("--checkpoint", default="models/.train-checkpoint")
    args = ap.parse_args()
    params = load_params(args.params)
    lora_p, train_p = params["lora"], params["train"]

    group = mx.distributed.init()
    lead = group.rank() == 0  # only rank 0 prints the summary and writes outputs
    blas.check(verbose=lead)
    fast_cpu = kernels.enable(params["kernels"]["fast_cpu"])
    mx.random.seed(train_p["seed"])  # LoRA's initial A matrices and dropout draw from this
    model, tokenizer = load(args.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # MLX's CPU backend is ~14x slower in bfloat16
    adapter_config = apply_lora(model, lora_p["rank"], lora_p["scale"], lora_p["dropout"],
                                lora_p["keys"], lora_p["num_layers"])
    trainable, total = parameter_counts(model)
    if lead:
        print(f"LoRA rank {lora_p['rank']} on {', '.join(lora_p['keys'])} in the last "
              f"{adapter_config['num_layers']} layers: {trainable:,} trainable parameters "
              f"({100 * trainable / total:.3f}% of {total:,})")

    data_cfg = types.SimpleNamespace(mask_prompt=train_p["mask_prompt"])
    train_set, valid_set, _ = load_local_dataset(Path(args.data), tokenizer, data_cfg)
    train_set, valid_set = CacheDataset(train_set), CacheDataset(valid_set)
    # the run's length: train.iters, or train.epochs x the batches of an epoch
    iters, batches_per_epoch = resolve_iters(train_p, len(train_set))
    cfg = TrainConfig.from_params(train_p, iters=iters)
    stopping_problem = early_stopping_problem("train", train_p, iters)
    if stopping_problem and lead:
        print(f"warning: {stopping_problem}", file=sys.stderr)
    # before any step: expected count (checked against the real one) and memory, refused
    # (a UserError naming the settings to change) when it cannot fit; the longest samples make
    # the widest batch, so they set the peak
    shape = memory.batch_shape([(len(tokens), offset) for tokens, offset in
                                (train_set[i] for i in range(len(train_set)))],
                               train_p["batch_size"], train_p["max_seq_length"])
    estimate = memory.check_before_training(
        args.model, lora_p, train_p, trainable, shape["width"], shape["targets"],
        dtype_bytes=4 if mx.default_device() == mx.cpu else None,
        dequantized=fast_cpu and kernels.SWAP_QUANTIZED_MATMUL,  # a quantized base's float copies
        out=None if lead else io.StringIO())  # every process refuses; rank 0 prints

    # weights, tokenizer and chat template by content, the kernels and this stage's code: a
    # resumed run continues the same computation
    fingerprint = run_fingerprint(lora_p, train_p, args.model, args.data, fast_cpu=fast_cpu,
                                  code=code_fingerprint(__file__))
    checkpoint = Checkpoint(args.checkpoint, fingerprint)
    outputs = StagedOutputs(checkpoint, args.out, args.metrics, args.live_dir, NOT_PLOTTED)

    with tqdm(total=cfg.iters, desc="train", unit="it", dynamic_ncols=True, disable=not lead) as bar, \
            outputs.on_failure_nothing_written(group.rank()):
        result = train(model, train_set, valid_set, cfg, checkpoint, log=outputs.log if lead else lambda record: None,
                       progress_bar=bar, group=group)
    if not lead:
        return 0

    best_val_loss, base_val_loss = result.best["val_loss"], result.base["val_loss"]
    summary = {
        "best_val_loss": best_val_loss,
        "best_val_perplexity": math.exp(best_val_loss),
        "best_iteration": result.best_iteration,
        "base_val_loss": base_val_loss,
        "base_val_perplexity": math.exp(base_val_loss),
        **result.ending(trainable, total),
        **epochs_summary(train_p, iters, batches_per_epoch, result.stopped_at),
        "trainable_share": trainable / total,
        "train_seconds": round(result.train_seconds, 1),
        "seconds_per_iteration": result.train_seconds / max(1, result.stopped_at),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "peak_memory_gb": round(result.peak_memory_gb, 3),
        "memory_estimate_gb": round(estimate["total_gb"], 3) if estimate else None,
        "val_samples": result.last["val_samples"],
        "val_tokens": result.last["val_tokens"],
    }
    outputs.commit(adapter_config, args.model, summary, fast_cpu)
    print(f"best val loss {best_val_loss:.4f} (ppl {summary['best_val_perplexity']:.2f}) at "
          f"iteration {result.best_iteration}; base model {base_val_loss:.4f} "
          f"(ppl {summary['base_val_perplexity']:.2f}). Stopped at {result.stopped_at}: "
          f"{result.stop_reason}. {summary['seconds_per_iteration']:.2f} s/it, "
          f"{summary['tokens_per_second']:.0f} tokens/s, peak memory {summary['peak_memory_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    run_stage("train", main)
