"""Publish a trained run to the Hugging Face hub, with a model card built from its metrics.

The folder uploaded is built first (files of the output, README.md = the card, loss.png;
the adapters' config names the base by its hub id instead of models/base), then one
``create_repo(exist_ok=True)``, a check of the repo's real visibility (``--private`` never
uploads into an existing public repo) and one ``upload_folder`` (one commit). Nothing is
published from stale outputs: DVC must say the stages behind them are current. The token comes
from HF_TOKEN or `hf auth login`; it is passed to the hub client and never printed or written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from voicetune.export import model_card
from voicetune.core.errors import UserError
from voicetune.core.freshness import require_fresh
from voicetune.core.params import load_params

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class PublishError(UserError):
    pass


@dataclass(frozen=True)
class Artifact:
    folder: str          # the stage output uploaded
    stages: tuple        # the DVC stages whose outputs the upload and its card read


# report reads all three evaluations; `with_deps` makes DVC check everything upstream too
ARTIFACTS = {
    "adapters": Artifact("models/adapters", ("train", "evaluate@base", "evaluate@lora", "report")),
    "fused": Artifact("models/fused", ("train", "fuse", "evaluate@base", "evaluate@fused", "report")),
    "gguf": Artifact("models/gguf", ("train", "fuse", "evaluate@base", "evaluate@fused", "report",
                                     "gguf")),
}
METRICS = ["metrics/compare.json", "metrics/eval_base.json", "metrics/train.json",
           "metrics/data.json", "metrics/plots/loss.png", "models/base/source.json"]
# written by us in the staging folder, never linked from the output (mlx-lm's fuse writes a
# README.md of its own; the adapters' config is rewritten)
GENERATED = {"README.md", model_card.PLOT, "adapter_config.json"}


def needed_paths(what: str) -> list[str]:
    evaluated = model_card.EVALUATED[what]
    return [ARTIFACTS[what].folder, f"metrics/eval_{evaluated}.json", *METRICS]


def redact(text: str, token: str | None) -> str:
    """``text`` without the token, or anything shaped like a hub token or a bearer header:
    hub exceptions can echo a request's headers."""
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)  # hub tokens: hf_ + 34


def _place(src: Path, dst: Path, link: bool) -> None:
    """A hard link when allowed (a fused Phi-3 is gigabytes), else a copy."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def stage_folder(what: str, root: Path, dest: Path, base: model_card.BaseModel, card,
                 link: bool = True) -> list[Path]:
    """Fill ``dest`` with exactly what is uploaded; return its files, sorted."""
    src = root / ARTIFACTS[what].folder
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src)
        if rel.as_posix() in GENERATED or any(part.startswith(".") for part in rel.parts):
            continue
        if item.is_dir():
            (dest / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            _place(item, dest / rel, link)
    if (src / "adapter_config.json").exists():
        config = json.loads((src / "adapter_config.json").read_text())
        # models/base means nothing on someone else's machine: name the base on the hub
        config["model"] = base.hub_id
        (dest / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy2(root / "metrics/plots/loss.png", dest / model_card.PLOT)
    card.save(dest / "README.md")
    return sorted(p for p in dest.rglob("*") if p.is_file())


def listing(folder: Path, files: list[Path]) -> str:
    lines = [f"  {f.stat().st_size:>14,}  {f.relative_to(folder).as_posix()}" for f in files]
    total = sum(f.stat().st_size for f in files)
    return "\n".join(lines + [f"  {total:>14,}  total ({len(files)} files)"])


@contextmanager
def staging(root: Path, out: Path | None) -> Iterator[tuple[Path, bool]]:
    """(folder, may hard-link): ``out`` kept for the user (copies, so editing it cannot touch
    the outputs), else a temporary folder beside the outputs (same disk: hard links), removed
    afterwards; its name matches .gitignore's atomic-write pattern."""
    if out is not None:
        if out.exists() and any(out.iterdir()):
            raise PublishError(f"--out {out} is not empty: name a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        yield out, False
        return
    (root / "models").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".publish.tmp-", dir=root / "models"))
    tmp.chmod(0o755)
    try:
        yield tmp, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hub_token() -> str:
    import huggingface_hub as hub

    token = hub.get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: log in with `hf auth login` (older clients: "
            "`huggingface-cli login`) or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens); `make publish ... DRY_RUN=1` needs none")
    return token


def _http_hint(err: Exception) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return (" The hub refused the token: log in again (`hf auth login`) or set HF_TOKEN to a "
                "token with write access to this namespace.")
    return ""


def check_visibility(repo_id: str, private: bool, token: str) -> None:
    """``create_repo(exist_ok=True)`` leaves an existing repo as it is: read its real
    visibility and refuse to upload into a public repo when a private one was asked for."""
    import huggingface_hub as hub

    try:
        is_private = hub.repo_info(repo_id, repo_type="model", token=token).private
    except Exception as err:
        raise PublishError(
            f"could not read the visibility of {repo_id} on the hub: {type(err).__name__}: "
            f"{redact(str(err), token)}\nNothing was uploaded.{_http_hint(err)} Rerun the same "
            "command.") from None
    if private and not is_private:
        raise PublishError(
            f"{repo_id} already exists and is public: --private does not change an existing "
            "repo's visibility, so nothing was uploaded. Make it private in its settings "
            f"(https://huggingface.co/{repo_id}/settings), publish to a new repo name, or drop "
            "PRIVATE=1 to publish it publicly.")
    print(f"{repo_id} is {'private' if is_private else 'public'} on the hub")


def upload(folder: Path, repo_id: str, private: bool, token: str, what: str, n_files: int) -> str:
    """create_repo + upload_folder (one commit); hub and network failures become a
    PublishError saying what was and was not uploaded, without the token."""
    import huggingface_hub as hub

    try:
        url = hub.create_repo(repo_id, token=token, private=private, exist_ok=True,
                              repo_type="model")
    except Exception as err:  # any failure of the hub client: HTTP, network, offline mode
        raise PublishError(
            f"could not create or open the model repo {repo_id} on the hub: "
            f"{type(err).__name__}: {redact(str(err), token)}\nNothing was uploaded."
            f"{_http_hint(err)} Check the network and the repo name, then rerun the same "
            "command.") from None
    check_visibility(repo_id, private, token)
    try:
        info = hub.upload_folder(repo_id=repo_id, folder_path=folder, token=token,
                                 repo_type="model",
                                 commit_message=f"voicetune: publish {what} with model card")
    except Exception as err:
        raise PublishError(
            f"uploading {n_files} files to {repo_id} failed: {type(err).__name__}: "
            f"{redact(str(err), token)}\nThe repo exists ({redact(str(url), token)}) but no "
            "commit was made: an upload is one commit, so none of these files is in it "
            f"(large files already sent are reused by a rerun).{_http_hint(err)} Rerun the same "
            "command to retry.") from None
    return getattr(info, "commit_url", None) or str(url)


def publish(repo_id: str, what: str = "adapters", private: bool = False, dry_run: bool = False,
            license: str | None = None, base_hub_id: str | None = None, out: Path | None = None,
            root: Path = Path("."), params_path: str = "params.yaml") -> None:
    if not REPO_ID.match(repo_id):
        raise PublishError(f"--repo {repo_id!r} is not a hub repo id: use OWNER/NAME, e.g. "
                           "--repo your-username/my-voice (make publish REPO=...)")
    token = None if dry_run else hub_token()  # before the slow checks: fail fast
    artifact = ARTIFACTS[what]
    require_fresh(list(artifact.stages), needed_paths(what), root)
    params = load_params(root / params_path)
    record = model_card.RunRecord.read(root, model_card.EVALUATED[what], params)
    base = model_card.base_model(record.source, base_hub_id, license)
    card = model_card.build_card(what, repo_id, base, record)
    with staging(root, out) as (folder, link):
        files = stage_folder(what, root, folder, base, card, link)
        print(f"{what} for {repo_id}{' (private)' if private else ''}: {len(files)} files")
        print(listing(folder, files))
        if dry_run:
            print(f"\n--- README.md (the model card) ---\n{card.content}\n--- end ---")
            kept = f"it is kept in {out}" if out else "--out DIR keeps it"
            print(f"dry run: nothing uploaded ({kept}); without --dry-run this folder goes to "
                  f"https://huggingface.co/{repo_id}")
            return
        print(f"uploading to https://huggingface.co/{repo_id} ...")
        where = upload(folder, repo_id, private, token, what, len(files))
        print(f"published: {where}")
