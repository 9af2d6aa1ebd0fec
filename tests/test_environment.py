"""Every benchmark record names the code it was measured with: the checkout's commit, marked
dirty where tracked files differ from it, "unknown" outside a git checkout or below its top."""
import shutil
import subprocess

import pytest

from rwdeploy.runtime.environment import code_version, environment

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture()
def repo(tmp_path):
    tmp_path = tmp_path / "a checkout"   # a space in the path, as a user's folder may have
    tmp_path.mkdir()
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_clean_checkout_is_its_short_commit(repo):
    assert code_version(repo) == _git(repo, "rev-parse", "--short", "HEAD").strip()


def test_changed_tracked_file_marks_the_commit_dirty(repo):
    sha = _git(repo, "rev-parse", "--short", "HEAD").strip()
    (repo / "a.txt").write_text("two\n")
    assert code_version(repo) == f"{sha}-dirty"
    (repo / "a.txt").write_text("one\n")
    (repo / "untracked.txt").write_text("scratch\n")  # a result file being written is not a code change
    assert code_version(repo) == sha


def test_outside_a_checkout_is_unknown(tmp_path):
    assert code_version(tmp_path) == "unknown"


def test_a_folder_inside_another_checkout_is_unknown(repo):
    # an installed package in a virtual environment that sits inside the user's own repository
    inside = repo / "venv" / "site-packages"
    inside.mkdir(parents=True)
    assert code_version(inside) == "unknown"


def test_environment_records_the_commit():
    assert environment()["rwdeploy_commit"] == code_version()
