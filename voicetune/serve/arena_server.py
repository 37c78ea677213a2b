"""The arena's server: the models loaded, the page built (``arena_app``) over the generation
engine (``arena_engine``), served by uvicorn on a free port; ``python -m voicetune.tools.arena``
is its command line."""
from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.data.votes import weights_identity
from voicetune.evaluate.questions import battle_questions
from voicetune.evaluate.ratings import voice_models
from voicetune.serve.arena_ratings import ratings_fn


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


def serve(params: dict, *, host: str, port: int, votes: str | Path, test: str | Path,
          paths: dict[str, str], system: str | None = None, max_tokens: int | None = None,
          temperature: float | None = None, check: bool = True,
          rewrite_max_tokens: int | None = None) -> int:
    """Load the models, build the page and serve it until Ctrl-C. ``params``: params.yaml,
    validated; ``paths``: the weight folders by short name (``voicetune.models.registry.FILES``);
    ``temperature``/``max_tokens``/``system``: the command line's, None for params.yaml's;
    ``rewrite_max_tokens``: a rewrite battle's length limit, None for eval.rewrite_max_tokens
    (``max_tokens`` is the Q&A battles' and the chat tab's only)."""
    import uvicorn

    from voicetune.serve.arena_app import ArenaConfig, create_app
    from voicetune.serve.arena_engine import Engine, mlx_answer_fn
    from voicetune.serve.chat import Settings
    from voicetune.models.loader import ChatModels
    from voicetune.models.registry import NAMES

    settings = Settings.from_params(params, max_tokens)
    asked = temperature
    temperature = params["arena"]["temperature"] if asked is None else asked
    if not temperature > 0:
        raise UserError(f"--temperature {asked}: battles must sample (a number > 0): "
                        "a greedy answer is the one the chat tab and data/eval/ show, and a judge "
                        "could look it up")
    battle_models = params["arena"]["models"]
    # the chat tab offers base and lora (one copy of the weights), and whatever battles
    chat_models = [n for n in NAMES if n in battle_models or n in ("base", "lora")]
    check_port_free(host, port)
    if not is_loopback(host):
        print(f"WARNING: listening on {host}: anyone who can reach this machine can chat "
              "with your models and vote. The arena has no login; use 127.0.0.1 unless you "
              "mean it.", file=sys.stderr)
    models = ChatModels(paths["base"], paths["adapters"], paths["fused"], check=check,
                        preference_adapters=paths["preference_adapters"],
                        fast_cpu=params["kernels"]["fast_cpu"])
    models.prepare(sorted(set(battle_models) | set(chat_models), key=NAMES.index))  # no load mid-battle
    # checked fresh above, so dvc.lock's md5s are the weights' loaded; by path: unknown
    identity = weights_identity(".") if check else None
    config = ArenaConfig(models=battle_models, chat_models=chat_models,
                         system=system or params["data"]["system_prompt"], settings=settings,
                         temperature=temperature, votes=Path(votes), weights=identity,
                         questions=battle_questions(test),
                         rewrite_max_tokens=params["eval"]["rewrite_max_tokens"]
                         if rewrite_max_tokens is None else rewrite_max_tokens,
                         ratings=ratings_fn(params, identity,
                                            # the voice scores are the pipeline's models': not
                                            # shown beside models given by path
                                            voice=voice_models() if check else None))
    app = create_app(Engine(mlx_answer_fn(models)), config)
    print(f"arena: http://{host}:{port}  (votes -> {votes}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
