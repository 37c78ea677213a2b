"""Stage preference: DPO (or ORPO) adapters on models/fused from data/pairs -> models/preference_adapters.

    python stages/preference.py            # reads params.yaml (the preference section)

New LoRA layers on the fused SFT model; the reference policy is the same weights with them
switched off (one model in memory), its log-probabilities computed once before the first
step. Load the result with `mlx_lm.load("models/fused", adapter_path="models/preference_adapters")`.

Killed mid-run? Run it again (or `dvc repro`): it resumes from the last checkpoint in
models/.preference-checkpoint and ends with the same best adapter as an uninterrupted run.
Outputs change only when a run succeeds, and then each at once: a failed or killed run
leaves models/preference_adapters, metrics/preference.json and dvclive/preference as the
last good run wrote them.
"""
import argparse
import math
import sys
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas  # before mlx: a fast BLAS on Linux
from voicetune.core import kernels
from voicetune.core.code_hash import code_fingerprint
from voicetune.models.fusion import load_float32
from voicetune.models.lora import apply_lora, parameter_counts
from voicetune.core.params import early_stopping_problem, load_params
from voicetune.train.checkpoint import Checkpoint
from voicetune.train.outputs import StagedOutputs
from voicetune.train.pairs import check_counts, read_pairs, tokenize_pairs
from voicetune.train.preference import PreferenceConfig, run_fingerprint, train_preference

import mlx.core as mx  # noqa: E402  (after voicetune, which sets up a fast BLAS first)
from tqdm import tqdm  # noqa: E402

# recorded in metrics and the checkpoint's history, but constant: not plotted
NOT_PLOTTED = {"step", "val_pairs", "val_tokens"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/fused")
    ap.add_argument("--data", default="data/pairs")
    ap.add_argument("--out", default="models/preference_adapters")
    ap.add_argument("--metrics", default="metrics/preference.json")
    ap.add_argument("--live-dir", default="dvclive/preference")
    ap.add_argument("--checkpoint", default="models/.preference-checkpoint")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p = params["preference"]
    cfg = PreferenceConfig.from_params(p)
    data = Path(args.data)
    rows = {name: read_pairs(data / f"{name}.jsonl") for name in ("train", "valid")}
    check_counts(rows["train"], rows["valid"])  # before the model is loaded
    stopping_problem = early_stopping_problem("preference", p)
    if stopping_problem:
        print(f"warning: {stopping_problem}", file=sys.stderr)

    blas.check()
    fast_cpu = kernels.enable(params["kernels"]["fast_cpu"])
    model, tokenizer, _ = load_float32(args.model)  # float32 on CPU, like the fuse stage's check
    mx.random.seed(cfg.seed)  # the new LoRA's initial A matrices and the dropout draw from this
    lora = p["lora"]
    adapter_config = apply_lora(model, lora["rank"], lora["scale"], lora["dropout"], lora["keys"],
                                lora["num_layers"])
    trainable, total = parameter_counts(model)
    pairs = {name: tokenize_pairs(r, tokenizer, cfg.max_seq_length, str(data / f"{name}.jsonl"))
             for name, r in rows.items()}
    print(f"{cfg.method.upper()} (beta {cfg.beta}) on {len(pairs['train'])} pairs, "
          f"{len(pairs['valid'])} held out; LoRA rank {lora['rank']} on {', '.join(lora['keys'])} "
          f"in the last {adapter_config['num_layers']} layers of {args.model}: {trainable:,} "
          f"trainable parameters ({100 * trainable / total:.3f}% of {total:,})")

    # weights, tokenizer and chat template by content, the kernels and this stage's code: a
    # resumed run continues the same computation
    checkpoint = Checkpoint(args.checkpoint, run_fingerprint(p, args.model, args.data, fast_cpu=fast_cpu,
                                                             code=code_fingerprint(__file__)))
    outputs = StagedOutputs(checkpoint, args.out, args.metrics, args.live_dir, NOT_PLOTTED)

    batches = sum(math.ceil(len(pairs[name]) / cfg.batch_size) for name in ("train", "valid"))
    with tqdm(total=batches if cfg.method == "dpo" else 0, desc="reference log-probs", unit="batch",
              disable=cfg.method != "dpo", dynamic_ncols=True) as reference_bar, \
            tqdm(total=cfg.iters, desc="preference", unit="it", dynamic_ncols=True) as bar, \
            outputs.on_failure_nothing_written():
        result = train_preference(model, pairs["train"], pairs["valid"], cfg, checkpoint, log=outputs.log,
                                  progress_bar=bar, reference_progress=reference_bar.update)

    base, best = result.base, result.best
    summary = {
        "method": cfg.method,
        "beta": cfg.beta,
        "train_pairs": len(pairs["train"]),
        "valid_pairs": len(pairs["valid"]),
        "base_val_loss": base["val_loss"],
        "base_val_reward_accuracy": base["val_reward_accuracy"],
        "best_val_loss": best["val_loss"],
        "best_val_reward_accuracy": best["val_reward_accuracy"],
        "best_val_reward_margin": best["val_reward_margin"],
        "best_val_chosen_reward": best["val_chosen_reward"],
        "best_val_rejected_reward": best["val_rejected_reward"],
        "best_iteration": result.best_iteration,
        **result.ending(trainable, total),
        "train_seconds": round(result.train_seconds, 1),
        "seconds_per_iteration": result.train_seconds / max(1, result.stopped_at),
        "reference_seconds": round(result.reference_seconds, 1),
        "validation_seconds": round(result.validation_seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "peak_memory_gb": round(result.peak_memory_gb, 3),
        "val_tokens": best["val_tokens"],
    }
    outputs.commit(adapter_config, args.model, summary, fast_cpu)
    print(f"{cfg.method} best val loss {best['val_loss']:.4f} (reward accuracy "
          f"{best['val_reward_accuracy']:.2f}, margin {best['val_reward_margin']:+.4f}) at iteration "
          f"{result.best_iteration}; step 0 {base['val_loss']:.4f}. Stopped at {result.stopped_at}: "
          f"{result.stop_reason}. Reference {result.reference_seconds:.1f} s, validation "
          f"{result.validation_seconds:.1f} s, peak memory {summary['peak_memory_gb']:.2f} GB")
    if result.best_iteration == 0:
        print("warning: no validation beat step 0: the adapters saved are step 0's, which change "
              "nothing (the model equals models/fused)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_stage("preference", main)
