"""Stage base_model: resolve params.model.source into models/base/ (an HF-format folder).

    python stages/base_model.py            # reads params.yaml (model section)

models/base/source.json records where the weights came from; for a hub repo, the full commit
sha that was downloaded (a branch or tag in model.revision is resolved to one, with a warning).
With model.quantize (4 or 8) a float source is quantized with mlx-lm (QLoRA trains on it); a
source that is already quantized is used as it is. source.json records the quantization.
"""
import argparse
import json
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.models import base_model, quantize
from voicetune.models.chat_template import end_of_turn_token
from voicetune.core.files import atomic_dir
from voicetune.core.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/base")
    args = ap.parse_args()
    p = load_params(args.params)["model"]

    template = base_model.read_chat_template_param(p["chat_template"])
    with atomic_dir(args.out) as out:
        record = base_model.materialize(p["source"], p["revision"], out)
        if template is not None:
            base_model.override_chat_template(out, template)
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(out)
        eot = end_of_turn_token(tokenizer)
        eot_ids = [tokenizer.convert_tokens_to_ids(eot)] if eot else []
        eos_ids = base_model.write_generation_config(out, eot_ids)
        quantized_here = quantize.check_request(quantize.folder_quantization(out),
                                                p["quantize"], p["quantize_group_size"])
        if quantized_here:
            print(f"quantizing to {p['quantize']} bits (group size {p['quantize_group_size']}) ...")
            quantize.quantize_folder(out, p["quantize"], p["quantize_group_size"])
        q = quantize.record(out, quantized_here)

    config = json.loads((Path(args.out) / "config.json").read_text())
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(
        f"base model: {p['source']}{'@' + record['commit_sha'] if record['commit_sha'] else ''}"
        f" -> {args.out} ({config['model_type']}, "
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"{size / 2**20:.0f} MiB of {quantize.describe(q)} weights); end of turn {eot!r}, "
        f"stop ids {eos_ids}"
    )


if __name__ == "__main__":
    run_stage("base_model", main)
