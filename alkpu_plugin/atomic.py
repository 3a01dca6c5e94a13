"""Writing a file so that a file with the final name is always complete.

Every file the plugin writes goes through one of these: the content is written
under a temporary name in the same directory and renamed into place, so a
process killed at any moment leaves either the old file or the new one, never a
part of one (``os.replace`` is atomic on POSIX file systems).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_symlink", "atomic_output", "append_line"]


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, writer: Callable[[IO], None], binary: bool = True) -> Path:
    """Call ``writer(fh)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            writer(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def atomic_symlink(link: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make ``link`` point at ``target``, replacing what was there in one rename
    (there is no moment without the link)."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink()
        raise
    return link


def atomic_output(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """``writer(tmp)`` makes a file or a directory (e.g. a deepmd/npy system) at the path
    ``tmp`` beside ``path``; it is then renamed to ``path``. An existing ``path`` is
    replaced only once the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    old = None
    try:
        writer(str(tmp))
        if path.is_dir() and not path.is_symlink():
            old = tmp_dir / (path.name + ".old")
            os.replace(path, old)  # a directory cannot be replaced by a rename onto it
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single ``write`` call on an O_APPEND descriptor: a kill
    leaves the line whole or absent (readers still skip a last line that does not parse)."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
