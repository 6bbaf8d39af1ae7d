"""Write-then-rename: a file or folder appears whole or not at all, whatever kills the process."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it is renamed onto `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a new temporary folder beside `path` to fill; when the block succeeds it becomes `path`.

    With replace, a folder already at `path` is swapped out and deleted. Without it, a non-empty folder
    already there wins and the temporary one is dropped: several processes may build the same folder at
    once, and the first to finish is kept while the others may already be reading it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for item in [tmp, *tmp.rglob("*")]:
            _default_mode(item)
        if replace and _holds_files(path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        elif not _holds_files(path):
            try:
                if path.is_dir():
                    path.rmdir()  # rename cannot replace a directory portably, even an empty one
                os.rename(tmp, path)
            except OSError:
                if not _holds_files(path):
                    raise  # not another process finishing first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_mode(path: Path) -> None:
    """The permissions a plain open() or mkdir() would give: safetensors writes 0600 and mkdtemp makes 0700."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _holds_files(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))
