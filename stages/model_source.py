"""Stage model_source: what params.model.source points at -> models/source-fingerprint.json.

    python stages/model_source.py          # reads params.yaml (model section)

Runs on every `dvc repro` (always_changed) and takes a fraction of a second: file hashes are
cached by size, mtime and inode. base_model depends on the fingerprint, so editing a local
model folder reruns it, and identical bytes leave it up to date.
"""
import argparse
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.core.files import dump_json, write_json_atomic
from voicetune.core.params import load_params
from voicetune.models.source import fingerprint, read_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/source-fingerprint.json")
    ap.add_argument("--hash-cache", default="models/.source-hashes.json")
    args = ap.parse_args()
    p = load_params(args.params)["model"]

    cache_path = Path(args.hash_cache)
    cache = read_cache(cache_path)
    found = fingerprint(str(p["source"]), p.get("revision"), cache)
    write_json_atomic(cache_path, cache)
    out = Path(args.out)
    if not out.exists() or out.read_text(encoding="utf-8") != dump_json(found):
        write_json_atomic(out, found)  # unchanged bytes are not even rewritten
    print(f"model source: {found['kind']} {found['source']} -> {args.out}")


if __name__ == "__main__":
    run_stage("model_source", main)
