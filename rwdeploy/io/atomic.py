"""Write files and folders so that a failure leaves nothing half-written.

Everything goes to a temporary sibling first and is renamed into place only when complete;
a rename within one folder is atomic on POSIX file systems.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rwdeploy.errors import OptionError


def _check_parent(path: Path) -> Path:
    parent = path.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as err:
            raise OptionError(
                f"cannot create output folder {parent}: {err.strerror}",
                hint="choose a writable location",
            ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"output folder {parent} is not writable", hint="choose a writable location")
    return parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, base: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the published one the mode a
    plain open()/mkdir() would have, so outputs are readable like any other file."""
    if path.exists() and not path.is_symlink():
        os.chmod(path, base & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    parent = _check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path, 0o666)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `path` (replacing an old one)."""
    path = Path(path)
    parent = _check_parent(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"output path {path} exists and is not a folder", hint="choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        _publish_mode(tmp, 0o777)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
