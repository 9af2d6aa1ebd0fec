"""A normal (non-editable) install: the wheel carries passes/, runtime/ and models/ inside the
rwdeploy namespace, and its console script works."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return target


def _source_packages() -> set[str]:
    """Every package folder of the source tree, named as it installs."""
    roots = {"rwdeploy": "rwdeploy", "passes": "rwdeploy/passes", "runtime": "rwdeploy/runtime", "models": "rwdeploy/models"}
    found = set()
    for top, installed_as in roots.items():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            found.add(installed_as if str(rel) == "." else f"{installed_as}/{rel}")
    return found


def test_wheel_carries_every_package_in_the_namespace(installed):
    # Fails when a new subpackage is missing from [tool.setuptools] packages in pyproject.toml.
    for pkg in _source_packages():
        assert (installed / pkg / "__init__.py").is_file(), f"{pkg} is not installed: add it to pyproject.toml"
    code = "import rwdeploy.passes.layer_stats as a, rwdeploy.models as b, rwdeploy.runtime.latency as c; print(a.__file__, b.__file__, c.__file__)"
    env = dict(os.environ, PYTHONPATH=str(installed))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=installed)
    assert res.returncode == 0, res.stderr
    assert all(p.startswith(str(installed)) for p in res.stdout.split()), res.stdout


def test_console_script_runs(installed):
    script = installed / "bin" / "rwdeploy"
    assert script.is_file()
    env = dict(os.environ, PYTHONPATH=str(installed))
    res = subprocess.run([str(script), "inspect", "zoo:lenet5", "--json"], capture_output=True, text=True,
                         env=env, cwd=installed, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["totals"]["params"] == 431_080
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=env, cwd=installed)
    assert version.returncode == 0 and "rwdeploy" in version.stdout
