"""The locked environment: requirements.lock covers pyproject.toml, `make setup` installs it,
and the versions that produced a run are recorded with its metrics."""
import re
import tomllib

import pytest

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from voicetune.core.environment import PACKAGES, versions

from tests.conftest import ROOT, unavailable


def locked() -> dict[str, str]:
    """name -> version of every requirements.lock line that applies to this machine."""
    found = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line[0] in " #":
            continue
        req = Requirement(line.rstrip(" \\"))
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            found[canonicalize_name(req.name)] = spec.version
    return found


def declared(extras=("test",)) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def test_every_dependency_is_locked_at_a_version_its_range_allows():
    lock = locked()
    env = default_environment()
    problems = []
    for req in declared():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in lock:
            problems.append(f"{req.name} is not in requirements.lock")
        elif not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"{req.name}: locked {lock[name]} is outside {req.specifier}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_every_lock_entry_is_pinned_with_hashes():
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[a-z0-9])", text.strip())
    for entry in entries:
        if entry.startswith("#"):
            continue
        assert "==" in entry.splitlines()[0] and "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_test_environment_is_the_locked_one():
    """`make test` installs from the lock; a drifted venv would make outputs differ. A venv
    set up some other way is skipped on a developer's machine, and fails under CI."""
    lock = locked()
    found = versions()
    unlocked = [name for name in PACKAGES if canonicalize_name(name) not in lock]
    assert not unlocked, f"recorded with every run but not in requirements.lock: {unlocked}"
    drift = {name: (found[name], lock[canonicalize_name(name)]) for name in PACKAGES
             if found[name] != lock[canonicalize_name(name)]}
    if drift:
        unavailable(f"this venv was not installed from requirements.lock (installed, locked: "
                    f"{drift}); `make setup` does that")


def test_versions_names_the_interpreter_and_every_package():
    found = versions()
    assert re.fullmatch(r"3\.\d+\.\d+", found["python"])
    assert set(PACKAGES) <= set(found)
    assert versions(("surely-not-a-real-package-xyz",))["surely-not-a-real-package-xyz"] == "not installed"


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_drifted_venv_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    drifted = dict(versions(), mlx="0.0.1")
    monkeypatch.setattr(f"{__name__}.versions", lambda: drifted)
    monkeypatch.setenv("CI", ci)
    try:  # skip and fail are BaseExceptions: pytest.raises would let a skip through as a skip
        test_the_test_environment_is_the_locked_one()
        outcome_seen = None
    except BaseException as err:  # noqa: B036
        outcome_seen = err
    assert type(outcome_seen) is outcome, outcome_seen
    assert re.search(r"not installed from requirements.lock.*'mlx': \('0.0.1'", str(outcome_seen))
