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
import ipaddress
import json
import socket
import sys
from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.core.params import load_params
from voicetune.data.votes import VOTES, counted, read_votes, weights_identity, weights_match

PAIRS = Path("data/arena/pairs.jsonl")


def test_questions(path: Path) -> list[dict]:
    """The test split as battle questions: the conversation up to its last question (the
    evaluate stage's prompt), the question, and the author's answer (shown after the vote)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            out.append({"messages": messages[:-1], "question": messages[-2]["content"],
                        "reference": messages[-1]["content"]})
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror}. Is an arena already "
                            f"running? Stop it, or choose another port (make arena PORT=...)") from None


def ratings_fn(params: dict, identity: dict | None):
    """votes -> the table the page shows: the arena stage's own computation (``identity``:
    the weights' md5s in dvc.lock; None, models given by path: every vote counts)."""
    from voicetune.evaluate.ratings import compute_ratings, table_rows

    arena = params["arena"]
    current = counted(arena["adapter"], identity)

    def ratings(votes):
        result = compute_ratings(votes, current, weights=identity, models=arena["models"],
                                 rounds=arena["rounds"], seed=arena["seed"])
        return table_rows(result)
    return ratings


def serve(args) -> int:
    import uvicorn

    from voicetune.serve.arena_app import ArenaConfig, create_app
    from voicetune.serve.arena_engine import Engine, mlx_answer_fn
    from voicetune.serve.chat import Settings
    from voicetune.models.registry import NAMES, ChatModels

    params = load_params(args.params)
    settings = Settings.from_params(params, args.max_tokens)
    temperature = params["arena"]["temperature"] if args.temperature is None else args.temperature
    if not temperature > 0:
        raise UserError(f"--temperature {args.temperature}: battles must sample (a number > 0): "
                        "a greedy answer is the one the chat tab and data/eval/ show, and a judge "
                        "could look it up")
    battle_models = params["arena"]["models"]
    # the chat tab offers base and lora (one copy of the weights), and whatever battles
    chat_models = [n for n in NAMES if n in battle_models or n in ("base", "lora")]
    check_port_free(args.host, args.port)
    if not is_loopback(args.host):
        print(f"WARNING: listening on {args.host}: anyone who can reach this machine can chat "
              "with your models and vote. The arena has no login; use 127.0.0.1 unless you "
              "mean it.", file=sys.stderr)
    models = ChatModels(args.base, args.adapters, args.fused, check=not args.no_check,
                        preference_adapters=args.preference_adapters,
                        fast_cpu=params["kernels"]["fast_cpu"])
    models.prepare(sorted(set(battle_models) | set(chat_models), key=NAMES.index))  # no load mid-battle
    # checked fresh above, so dvc.lock's md5s are the weights' loaded; by path: unknown
    identity = weights_identity(".") if not args.no_check else None
    config = ArenaConfig(models=battle_models, chat_models=chat_models,
                         system=args.system or params["data"]["system_prompt"], settings=settings,
                         temperature=temperature, votes=Path(args.votes), weights=identity,
                         questions=test_questions(Path(args.test)),
                         ratings=ratings_fn(params, identity))
    app = create_app(Engine(mlx_answer_fn(models)), config)
    print(f"arena: http://{args.host}:{args.port}  (votes -> {args.votes}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def export(args) -> int:
    from voicetune.data.vote_pairs import pairs_from_votes, write_pairs

    votes_path = Path(args.votes)
    if not votes_path.exists():
        raise UserError(f"--votes {votes_path}: no such file (the arena page, make arena, writes "
                        f"the votes to {VOTES}); nothing written")
    if not votes_path.is_file():
        raise UserError(f"--votes {votes_path}: not a file; nothing written")
    votes, warnings = read_votes(votes_path)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    read = f"{len(votes)} vote(s) read from {votes_path}"
    if not args.all_adapters:
        identity = weights_identity(".")
        kept = [v for v in votes if weights_match(v, identity)]
        read += (f", {len(kept)} for the current weights ({len(votes) - len(kept)} for other "
                 f"weights{'' if any(identity.values()) else ': dvc.lock records none'}; "
                 "--all-adapters takes them all)")
        votes = kept
    pairs = pairs_from_votes(votes)
    write_pairs(args.out, pairs, votes=votes_path)
    print(f"{read}; {len(pairs)} preference pair(s) from them (ties, both bad and equal "
          f"answers give none) -> {args.out}")
    return 0


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
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--no-check", action="store_true",
                    help="skip DVC's freshness check (models given by path, outside the pipeline)")
    ap.add_argument("--out", default=str(PAIRS), help="export: where the pairs go")
    ap.add_argument("--all-adapters", action="store_true",
                    help="export: votes for every adapter, not only the current one")
    args = ap.parse_args(argv)
    return serve(args) if args.command == "serve" else export(args)
