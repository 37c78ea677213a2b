"""`python -m voicetune.tools.memory_plan`: which training settings fit in memory (make plan).

    python -m voicetune.tools.memory_plan                       # params.yaml + models/base, here
    python -m voicetune.tools.memory_plan --machine-gb 8 16 32  # on Macs with that much RAM
    python -m voicetune.tools.memory_plan --config phi3-mini --params recipes/phi3-blog.yaml

The estimate, the usable-memory rule and the plan are voicetune.models.memory's (docs/memory.md).
"""
import argparse
import json
import sys
from pathlib import Path

import yaml

from voicetune.core.params import load_params
from voicetune.fixtures.random_model import PHI3_MINI_4K_CONFIG
from voicetune.models import memory

PHI3_LORA_KEYS = ["self_attn.qkv_proj", "self_attn.o_proj"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--recipe", help="a recipes/*.yaml: its model, lora and train keys over "
                    "--params' (as `make recipe` would set them)")
    ap.add_argument("--model", default="models/base", help="a folder with the model's config.json")
    ap.add_argument("--config", choices=["phi3-mini"],
                    help="plan for this model instead (bf16 weights, Phi-3's LoRA keys, a Mac)")
    ap.add_argument("--machine-gb", type=float, nargs="*",
                    help="RAM of Macs to plan for (usable: Metal's working set, see docs/memory.md)")
    ap.add_argument("--seq-len", type=int, help="the longest training sample in tokens "
                    "(default: train.max_seq_length, a bound)")
    ap.add_argument("--dtype-bytes", type=int, choices=[2, 4],
                    help="bytes per float (default: 2 for a Mac or bf16 model, 4 on a CPU)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    if args.recipe:
        recipe = yaml.safe_load(Path(args.recipe).read_text()) or {}
        for section in ("model", "lora", "train"):
            params[section] = {**params[section], **recipe.get(section, {})}
    lora, train = params["lora"], params["train"]
    quantize = params["model"].get("quantize")
    group_size = params["model"].get("quantize_group_size", 64)
    if args.config == "phi3-mini":
        config, name = PHI3_MINI_4K_CONFIG, "Phi-3-mini-4k"
        if any(k not in memory.linear_shapes(config) for k in lora["keys"]):
            lora = {**lora, "keys": PHI3_LORA_KEYS}
        dtype_bytes = args.dtype_bytes or 2
    else:
        config_path = Path(args.model) / "config.json"
        if not config_path.exists():
            print(f"memory_plan: no {config_path} (run `dvc repro base_model` first, or use "
                  "--config phi3-mini)", file=sys.stderr)
            return 1
        config, name = json.loads(config_path.read_text()), args.model
        torch_dtype = config.get("torch_dtype")
        dtype_bytes = args.dtype_bytes or (4 if args.machine_gb is None or torch_dtype == "float32"
                                           else 2)
        if config.get("quantization"):
            quantize = memory.AS_CONFIGURED
    if args.machine_gb:
        machines = [(f"{gb:g} GB Mac", memory.mac_usable_gb(gb)) for gb in args.machine_gb]
    else:
        usable, source = memory.memory_limit(train)
        machines = [(f"this machine ({source})", usable)]
    try:
        est = memory.memory_estimate(config, lora, train, dtype_bytes, args.seq_len,
                                     quantize=quantize, group_size=group_size)
    except memory.EstimateError as err:
        print(f"memory_plan: {err}", file=sys.stderr)
        return 1
    print(f"{name}: {est['base_parameters']:,} parameters; LoRA rank {lora['rank']} on "
          f"{', '.join(lora['keys'])} in {lora['num_layers'] if lora['num_layers'] != -1 else 'all'} "
          f"layers ({est['trainable_parameters']:,} trainable); model.quantize: "
          f"{memory._show(est['quantize_bits'])}, train.grad_checkpoint: "
          f"{memory._show(est['grad_checkpoint'])}")
    memory.report(est, machines[0][1], machines[0][0])
    print()
    print(memory.plan_table(config, lora, train, machines, dtype_bytes, args.seq_len,
                            quantize=quantize, group_size=group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
