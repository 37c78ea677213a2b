import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # beside the checkout on dev machines and CI, never on users'


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """The embedded default model converted once per test session (about 10 s)."""
    from voicetune.base_model import materialize, write_generation_config

    out = tmp_path_factory.mktemp("base")
    materialize("embedded:smollm2-135m-instruct", None, out)
    write_generation_config(out, [2])
    return out


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(base_model_dir)


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
