"""The environment the suite runs in is exactly the locked set (`constraints.txt`).

A fresh install resolves whatever upstream published last; the lock is what keeps main green. These
tests fail when the venv drifts from the lock or the lock stops covering what pyproject asks for.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
NOT_LOCKED = {"lora-farm", "pip", "setuptools", "wheel"}  # the project itself and the venv's tools
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)\s*(?:;(?P<marker>.+))?$")


def locked_versions() -> dict[str, str]:
    """name -> version of every pin whose marker holds on this interpreter."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line.strip())
        if match and (match["marker"] is None or Marker(match["marker"]).evaluate()):
            pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def installed_versions() -> dict[str, str]:
    return {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def test_every_installed_package_is_the_locked_version():
    locked = locked_versions()
    drift = []
    for name, version in sorted(installed_versions().items()):
        if name in NOT_LOCKED:
            continue
        if name not in locked:
            drift.append(f"{name}=={version} is installed but not in the lock")
        elif Version(version).public != Version(locked[name]).public:  # torch 2.13.0+cpu is 2.13.0
            drift.append(f"{name}=={version} is installed, the lock says {locked[name]}")
    assert not drift, ("the venv is not the locked set; reinstall with "
                       "`pip install -c constraints.txt -e '.[train,dev]'`:\n" + "\n".join(drift))


def test_the_lock_pins_every_dependency_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted.extend(extra)
    locked = locked_versions()
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is in pyproject.toml but not in constraints.txt: refresh the lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]}, outside pyproject's `{requirement.specifier}`")


def test_the_dev_path_pins_the_cpu_torch_release():
    assert locked_versions()["torch"] == "2.13.0"
