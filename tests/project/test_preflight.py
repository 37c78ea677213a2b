"""The preflight before `dvc repro`: missing sources named by their params key, with the fix."""
import shutil
import subprocess
import sys

import pytest
import yaml

from voicetune.project import preflight
from voicetune.core.params import ParamsError

from tests.conftest import ROOT


@pytest.fixture
def project(tmp_path):
    """The repository's tracked files (code, params.yaml, dvc.yaml, sample data), no outputs."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def set_params(project, **values):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in values.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_the_repository_as_committed_passes(project):
    """Outputs of stages (models/, data/processed, metrics) are not sources: a fresh clone,
    which has none of them yet, passes."""
    assert not (project / "models").exists()
    preflight.check(project)


def test_my_blog_without_posts_names_the_key_and_what_to_put_there(project):
    set_params(project, ingest__source="posts", data__source="data/ingested/pairs.jsonl")
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(project)
    assert str(err.value) == (
        "1 problem before `dvc repro` (nothing was run):\n"
        "  params.yaml: ingest.source: posts/ does not exist yet: create it and put your posts "
        "in it (Markdown with front matter, saved HTML pages, RSS/Atom feed exports; subfolders "
        "are read too). data/sample/posts/ holds an example of each kind; `cp -r "
        "data/sample/posts posts` tries the pipeline on them. Until it exists, `dvc repro` "
        "stops: posts is a dependency of the ingest stage")
    # the fix it gives works
    subprocess.run("cp -r data/sample/posts posts", shell=True, cwd=project, check=True)
    preflight.check(project)


def test_every_missing_source_at_once(project):
    set_params(project, ingest__source="posts", data__source="data/mine.jsonl")
    (project / "data/arena/votes.jsonl").unlink()
    with pytest.raises(preflight.PreflightError) as err:
        preflight.check(project)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 problems before `dvc repro`")
    assert lines[1].startswith("  params.yaml: ingest.source: posts/ does not exist yet")
    assert lines[2].startswith("  params.yaml: data.source: data/mine.jsonl does not exist "
                               "(the prepare stage reads it): it is the Q&A dataset")
    assert lines[3] == ("  dvc.yaml: data/arena/votes.jsonl does not exist and no stage writes it (the "
                        "pairs_votes and arena stages read it): restore it (`git checkout -- "
                        "data/arena/votes.jsonl`)")
    assert len(lines) == 4


def test_params_problems_come_first_all_at_once(project):
    set_params(project, train__batch_size=0, ingest__source="posts")
    with pytest.raises(ParamsError, match=r"train.batch_size: got 0"):
        preflight.check(project)


def test_the_entry_point_prints_the_message_and_exits_1(project):
    set_params(project, data__source="nowhere.jsonl")
    done = subprocess.run([sys.executable, "-m", "voicetune.tools.preflight", "--root", str(project)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("preflight: 1 problem before `dvc repro`")
    assert "params.yaml: data.source: nowhere.jsonl does not exist" in done.stderr
