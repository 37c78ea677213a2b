"""Stage gguf: models/fused -> models/gguf/{model-<type>.gguf, Modelfile} + metrics/gguf.json.

    python stages/export_gguf.py              # reads params.yaml (gguf, data.system_prompt)
    python stages/export_gguf.py --type q8_0 --out /tmp/q8 --metrics /tmp/q8.json  # a try

The file is verified before it is moved into place: read back with the project's own GGUF
reader, its logits must match models/fused within gguf.logit_tolerance[type] and its
tokenizer must give the same ids. Then, in models/gguf: ollama create NAME -f Modelfile.
(Not stages/gguf.py: with stages/ first on sys.path, that name would shadow the ``gguf``
package for every stage script.)
"""
import argparse
import time
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core import blas  # before mlx: a fast BLAS on Linux
from voicetune.core.files import atomic_dir, write_json_atomic
from voicetune.core.params import load_params
from voicetune.evaluate.questions import read_test

from voicetune.export.gguf import TYPES, GgufExportError, export, verify  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--fused", default="models/fused")
    ap.add_argument("--test", default="data/processed/test.jsonl")
    ap.add_argument("--out", default="models/gguf")
    ap.add_argument("--metrics", default="metrics/gguf.json")
    ap.add_argument("--type", choices=sorted(TYPES), help="default: gguf.type in params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)  # validates all of params.yaml, before any work
    p, system = params["gguf"], params["data"]["system_prompt"]
    qtype = args.type or p["type"]
    tolerance = p["logit_tolerance"][qtype]
    blas.check(verbose=False)

    start = time.perf_counter()
    fused = Path(args.fused)
    rows = read_test(args.test, missing="run `dvc repro prepare` first")[: p["verify_prompts"]]
    with atomic_dir(args.out) as out:
        print(f"writing a {qtype} GGUF file and an Ollama Modelfile from {args.fused} ...")
        info = export(fused, out, qtype, system)
        name = info["file"]
        print(f"verifying: reading it back, {len(rows)} test conversations ...")
        report = verify(fused, out / name, [row["messages"] for row in rows], tolerance, system)
        if report["problems"]:  # the last good models/gguf and metrics/gguf.json stay
            raise GgufExportError(
                f"{args.out}/{name} rejected:\n  " + "\n  ".join(report["problems"])
                + f"\n(gguf.logit_tolerance.{qtype} in {args.params} is the logit bound; a "
                "tokenizer mismatch is a bug of the export)")
        size = (out / name).stat().st_size
    metrics = {"type": qtype, "file": name, "file_size_bytes": size,
               "chat_format": info["chat_format"], "end_of_turn_id": info["end_of_turn_id"],
               "stop": info["stop"], **report}
    write_json_atomic(args.metrics, metrics)
    print(f"{args.out}/{name}: {size / 1e6:.1f} MB; max |logit| difference vs {args.fused} "
          f"{report['max_abs_logit_diff']:.3g} (tolerance {tolerance:g}), top-1 agreement "
          f"{report['top1_agreement']:.2%}; tokenizer ids identical "
          f"{report['tokenizer_ids_identical']}/{report['tokenizer_texts']}; "
          f"{time.perf_counter() - start:.0f} s\n"
          f"Ollama: cd {args.out} && ollama create NAME -f Modelfile && ollama run NAME")
    return 0


if __name__ == "__main__":
    run_stage("export_gguf", main)  # the script's name, as every stage's messages
