"""Stage fuse: models/base + models/adapters -> models/fused (HF format) + metrics/fuse.json.

    python stages/fuse.py                  # reads params.yaml (fuse section)

The fused model is verified before it is moved into place: same logits as base+adapters
within fuse.logit_tolerance, same greedy answers, and different from the base model. A
quantized base (model.quantize, QLoRA) is fused dequantized: float weights.
"""
import argparse
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas  # before mlx: a fast BLAS on Linux
from voicetune.core.files import atomic_dir, write_json_atomic
from voicetune.models.fusion import FusionError, fuse, verify
from voicetune.models.quantize import describe
from voicetune.core.params import load_params
from voicetune.evaluate.questions import read_test

from mlx_lm.utils import load_tokenizer  # noqa: E402

from voicetune.models.generation import prompt_tokens  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--adapters", default="models/adapters")
    ap.add_argument("--test", default="data/processed/test.jsonl")
    ap.add_argument("--out", default="models/fused")
    ap.add_argument("--metrics", default="metrics/fuse.json")
    args = ap.parse_args()
    p = load_params(args.params)["fuse"]  # validates all of params.yaml, before any work
    blas.check(verbose=False)  # warns loudly when MLX runs on the slow reference BLAS

    tokenizer = load_tokenizer(Path(args.base))
    rows = read_test(args.test, missing="run `dvc repro prepare` first")[: p["verify_prompts"]]
    prompts = [prompt_tokens(tokenizer, row["messages"]) for row in rows]
    with atomic_dir(args.out) as out:
        print(f"fusing {args.adapters} into {args.base} ...")
        quantization = fuse(Path(args.base), Path(args.adapters), out)
        if quantization:
            print(f"the base is {describe(quantization)}: the fused model is dequantized "
                  "(float weights, as base+adapters computes them)")
        print(f"verifying on {len(prompts)} test prompts ...")
        report = verify(Path(args.base), Path(args.adapters), out, prompts,
                        p["logit_tolerance"], p["verify_max_tokens"])
        report["base_quantization"] = quantization
        report["fused_weights"] = "dequantized" if quantization else "float"
        if not report["ok"]:  # the last good models/fused and metrics/fuse.json stay
            raise FusionError("fused model rejected:\n  " + "\n  ".join(report["problems"]))
    write_json_atomic(args.metrics, report)
    print(f"fused model in {args.out}: max |logit| difference vs base+adapters "
          f"{report['max_abs_logit_diff_fused_vs_lora']:.2e} (tolerance {p['logit_tolerance']:.0e}), "
          f"vs base {report['max_abs_logit_diff_fused_vs_base']:.2e}; greedy answers identical "
          f"{report['greedy_answers_identical']}/{report['prompts']}")
    return 0


if __name__ == "__main__":
    run_stage("fuse", main)
