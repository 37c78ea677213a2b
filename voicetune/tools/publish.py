"""Publish a trained run to the Hugging Face hub, with a model card built from its metrics.

    python -m voicetune.tools.publish --repo user/name                  # the LoRA adapters
    python -m voicetune.tools.publish --repo user/name --what fused     # or the fused model
    python -m voicetune.tools.publish --repo user/name --what gguf      # or the GGUF + Modelfile
    python -m voicetune.tools.publish --repo user/name --dry-run        # build and show, upload nothing
"""
from __future__ import annotations

import argparse
from pathlib import Path

from voicetune.core.errors import run_stage
from voicetune.export.publish import ARTIFACTS, publish


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="hub repo id, OWNER/NAME")
    ap.add_argument("--what", choices=list(ARTIFACTS), default="adapters",
                    help="adapters (models/adapters), fused (models/fused) or gguf (models/gguf)")
    ap.add_argument("--private", action="store_true",
                    help="create the repo private (an existing public repo is refused)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the folder, print its listing and the card, upload nothing")
    ap.add_argument("--license", help="the base model's license id, when not known offline")
    ap.add_argument("--base-model", help="the base model's hub id (needed for a local-folder base)")
    ap.add_argument("--out", type=Path, help="build the folder here and keep it")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    publish(args.repo, args.what, args.private, args.dry_run, args.license, args.base_model,
            args.out, params_path=args.params)


if __name__ == "__main__":
    run_stage("publish", main)
