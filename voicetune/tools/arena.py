"""The blind arena: a local web page to chat with the models and judge them side by side.

    python -m voicetune.tools.arena                      # serve http://127.0.0.1:7860 (make arena)
    python -m voicetune.tools.arena --port 8000 --temperature 1.0
    python -m voicetune.tools.arena export               # votes -> preference pairs (DPO format)

Battles pit two of arena.models (params.yaml) against each other, named only after the vote;
votes go to data/arena/votes.jsonl, the `arena` stage turns them into ratings
(`dvc repro arena && dvc metrics show`). The persona is data.system_prompt. The chat tab
decodes as `make chat` does (eval.*); battles sample at arena.temperature (--temperature),
each with its own random seed, so that no side can be looked up.
"""
from __future__ import annotations

import argparse

from voicetune.core.errors import run_stage
from voicetune.core.params import load_params
from voicetune.data.votes import VOTES
from voicetune.serve.arena_export import PAIRS, export_pairs
from voicetune.serve.arena_server import serve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voicetune.tools.arena", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="serve", choices=["serve", "export"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--votes", default=str(VOTES))
    ap.add_argument("--test", default="data/processed/test.jsonl")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--adapters", default="models/adapters")
    ap.add_argument("--fused", default="models/fused")
    ap.add_argument("--preference-adapters", default="models/preference_adapters")
    ap.add_argument("--system", help="persona prompt (default: params.yaml's data.system_prompt)")
    ap.add_argument("--max-tokens", type=int, help="a Q&A battle's and the chat tab's length limit")
    ap.add_argument("--rewrite-max-tokens", type=int,
                    help="a rewrite battle's length limit (default: eval.rewrite_max_tokens)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--no-check", action="store_true",
                    help="skip DVC's freshness check (models given by path, outside the pipeline)")
    ap.add_argument("--out", default=str(PAIRS), help="export: where the pairs go")
    ap.add_argument("--all-adapters", action="store_true",
                    help="export: votes for every adapter, not only the current one")
    args = ap.parse_args(argv)
    if args.command == "export":
        return export_pairs(args.votes, args.out, args.all_adapters)
    return serve(load_params(args.params), host=args.host, port=args.port, votes=args.votes,
                 test=args.test, system=args.system, max_tokens=args.max_tokens,
                 rewrite_max_tokens=args.rewrite_max_tokens,
                 temperature=args.temperature, check=not args.no_check,
                 paths={"base": args.base, "adapters": args.adapters, "fused": args.fused,
                        "preference_adapters": args.preference_adapters})


if __name__ == "__main__":
    run_stage("arena", main)
