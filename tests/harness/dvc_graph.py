"""The DVC graph as DVC resolves it, and the files a real run's stages read (an audit hook
in every Python process): test_dvc_graph.py checks dvc.yaml's deps with them, and
test_pipeline.py's tiny end-to-end run checks what each stage really opened."""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

from tests.conftest import ROOT


def stages(root: Path = ROOT) -> dict:
    """Every stage of dvc.yaml as DVC itself resolves it (foreach expanded, ${} filled in)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.name: {"cmd": stage.cmd,
                             "deps": [Path(d.fs_path) for d in stage.deps],
                             "params": [Path(p.fs_path) for p in stage.params],
                             "outs": [Path(o.fs_path) for o in stage.outs]}
                for stage in repo.index.stages}


def script_of(cmd: str, root: Path = ROOT) -> Path:
    scripts = [word for word in shlex.split(cmd) if word.endswith(".py")]
    assert len(scripts) == 1, f"cannot find the one script of {cmd!r}"
    return root / scripts[0]


def covered(path: Path, paths: list[Path]) -> bool:
    """``path`` is one of ``paths`` or under one of them (a folder covers its contents)."""
    return any(path == p or p in path.parents for p in paths)


# --- files really read, from a run -------------------------------------------------------

SITECUSTOMIZE = '''
import atexit, json, os, sys

_LOG = os.environ["VOICETUNE_READ_LOG"]
_ROOT = os.environ["VOICETUNE_READ_ROOT"]
_reads = set()


def _hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path, mode, flags = (list(args) + [None, None])[:3]
    if isinstance(mode, str):
        reading = "r" in mode and "+" not in mode
    else:  # os.open; a folder opened to list or remove it (shutil.rmtree) is no read
        reading = isinstance(flags, int) and not flags & (os.O_WRONLY | os.O_RDWR | os.O_DIRECTORY)
    if reading:
        path = os.path.abspath(os.fsdecode(path))
        # a file that is there (shutil.rmtree opens folders by relative name and dir_fd)
        if path.startswith(_ROOT + os.sep) and os.path.isfile(path):
            _reads.add(path)


def _dump():
    with open(os.path.join(_LOG, f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "reads": sorted(_reads)}, f)


sys.addaudithook(_hook)
atexit.register(_dump)
'''

# DVC's and git's own files (DVCLive reads .gitignore and .dvcignore), and code caches
IGNORED = re.compile(r"(^|/)(\.dvc|\.git|__pycache__|site-packages|\.venv)(/|$)"
                     r"|^\.(git|dvc)ignore$")
# a temporary file or folder of voicetune.core.files' atomic writes stands for its target
ATOMIC_TEMP = re.compile(r"^\.(.+)\.(tmp|old)-[^/]*$")
# read on purpose without being deps: train's resume state (kept outside DVC, .dvcignore),
# model_source's cache of file hashes by size/mtime/inode (what DVC's own state cache does), and
# dvc.lock for arena and pairs: the train entry's md5 of models/adapters is the adapter the votes judged.
# DVC rewrites dvc.lock after every stage, so it cannot be a dep; models/adapters is, and that
# entry changes exactly when models/adapters does. The preference stage resumes from its own
# checkpoint as train does; ingest and rewrite read their caches of replies.
NOT_DEPS = {"train": ["models/.train-checkpoint"], "model_source": ["models/.source-hashes.json"],
            "arena": ["dvc.lock"], "pairs": ["dvc.lock"],
            "preference": ["models/.preference-checkpoint"], "ingest": ["cache/ingest"],
            "rewrite": ["cache/rewrite"]}


def read_audit_env(project: Path, log_dir: Path) -> dict:
    """Environment for a `dvc repro` whose Python processes log the project files they read."""
    site = log_dir / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, VOICETUNE_READ_LOG=str(log_dir),
                VOICETUNE_READ_ROOT=str(project.resolve()))


def stage_reads(project: Path, log_dir: Path) -> dict[str, set[Path]]:
    """Files read per stage, from the logs of processes whose command is a stage's."""
    by_cmd = {tuple(cmd): name for cmd, name in ((shlex.split(s["cmd"])[1:], n)
                                                  for n, s in stages(project).items())}
    reads: dict[str, set[Path]] = {}
    for log in log_dir.glob("*.json"):
        record = json.loads(log.read_text())
        name = by_cmd.get(tuple(record["argv"]))
        if name is not None:
            reads.setdefault(name, set()).update(Path(p) for p in record["reads"])
    return reads


def normalized(path: Path, project: Path) -> Path | None:
    rel = path.relative_to(project.resolve())
    if IGNORED.search(rel.as_posix()):
        return None
    parts = [ATOMIC_TEMP.sub(r"\1", part) for part in rel.parts]
    return project.resolve().joinpath(*parts)


def assert_reads_covered(project: Path, log_dir: Path) -> None:
    """Every project file a stage read is one of its deps, params files or outs."""
    all_stages = stages(project)
    reads = stage_reads(project, log_dir)
    assert set(reads) == set(all_stages), f"no read log for {set(all_stages) - set(reads)}"
    missing = {}
    for name, files in reads.items():
        stage = all_stages[name]
        allowed = [*stage["deps"], *stage["params"], *stage["outs"],
                   *(project.resolve() / p for p in NOT_DEPS.get(name, []))]
        allowed = [p.resolve() for p in allowed]
        lacking = sorted({n.relative_to(project.resolve()).as_posix() for n in
                          (normalized(p, project) for p in files)
                          if n is not None and not covered(n, allowed)})
        if lacking:
            missing[name] = lacking
    assert not missing, "stages read files that are not their deps:\n" + "\n".join(
        f"  {name}: {', '.join(files)}" for name, files in missing.items())
