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
import subprocess
import sys
import tempfile
from pathlib import Path

from voicetune.core import blas
from voicetune.core.files import write_json_atomic
from voicetune.bench.ceiling import (best_probe, elementwise_rates, mlx_matmul_probe, numpy_matmul_probe,
                                     training_flops_per_token)
from voicetune.bench.kernel_timing import kernels_worker, profile_table, profile_worker
from voicetune.bench.summary import print_report, summarize_generate, summarize_train, targets
from voicetune.bench.workers import FASTPATH, FRAMEWORKS, mlx_generate_worker, mlx_train_worker

TORCH_MISSING = 3  # bench_torch's exit code when torch/peft are not installed
PHI3_BENCH = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1536)
KEYS = {"llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "phi3": ["self_attn.qkv_proj", "self_attn.o_proj"]}
MODELS = ("smollm2-135m", "phi3-random-512x8")
SECTIONS = ("train", "generate", "kernels", "profile")


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
