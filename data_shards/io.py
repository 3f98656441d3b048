"""Writing files without losing anyone's: atomic files, output directories published whole.

The contract every writer in the project keeps (export, shard build, feature
encode, eval reports, caches, checkpoints):

- a file is written under a temporary name in its own directory, flushed and
  fsynced, then renamed over the target (``write_bytes_atomic``,
  ``write_text_atomic``): a reader sees the old file or the new one, never half;
- an output directory is filled as a fresh temporary sibling and renamed into
  place (``output_dir``); an existing target is replaced only when it is empty
  or recognisably an earlier output of the same tool (the caller's ``is_ours``,
  usually its marker file or manifest), and anything else is refused with an
  ``OutputDirError`` naming the path;
- ``.``, a parent of the working directory or of the project, the home
  directory and ``/`` are never accepted as an output, whatever they hold;
- what is created gets the umask's permissions, like any other file the user
  writes (``tempfile`` alone would leave 0600 files and 0700 directories).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class OutputDirError(ValueError):
    """An output path that must not be written or replaced (it would lose files that are not ours)."""


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    return 0o777 & ~_umask()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks of ``chunk`` bytes: the project's one file hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` for a library that writes files itself; renamed over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory in ``parent`` with the umask's permissions (mkdtemp alone gives 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, default_dir_mode())
    return tmp


def fix_tree_permissions(root: Path) -> None:
    """Give every file and directory under ``root`` the umask's permissions (after tempfile made them private)."""
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, dir_mode)
        for name in filenames:
            os.chmod(Path(dirpath) / name, file_mode)


def forbidden_output(path: Path) -> str | None:
    """Why ``path`` can never be an output directory, or None when it may be one."""
    target = path.expanduser().resolve()
    if target == Path(target.anchor):
        return "it is the filesystem root"
    if target == Path.home().resolve():
        return "it is the home directory"
    cwd = Path.cwd().resolve()
    if target == cwd:
        return "it is the current directory"
    if target in cwd.parents:
        return "it is a parent of the current directory"
    if target == _PROJECT_ROOT or target in _PROJECT_ROOT.parents:
        return "it holds the project's code"
    return None


def check_output_dir(path: str | os.PathLike[str], *, is_ours: Callable[[Path], bool], what: str) -> Path:
    """Refuse an output directory whose current content this tool did not write; returns the path.

    Accepted: a path that does not exist yet, an empty directory, or a directory
    for which ``is_ours`` holds (an earlier output of the same tool).
    """
    path = Path(path)
    why = forbidden_output(path)
    if why is not None:
        raise OutputDirError(f"refusing to write {what} to {path}: {why}; give a new directory")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputDirError(f"refusing to write {what} to {path}: it exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not is_ours(path):
        raise OutputDirError(
            f"refusing to replace {path}: it is not empty and does not hold an earlier {what}; "
            "give a new directory or remove it yourself"
        )
    return path


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory to ``final``, moving an existing ``final`` aside first.

    A crash between the two renames leaves the old output intact under a
    ``.old-`` sibling and the new one complete under its temporary name:
    nothing is lost either way.
    """
    fix_tree_permissions(tmp)
    if final.exists():
        aside = make_temp_dir(final.parent, prefix=f".old-{final.name}-")
        final.rename(aside / final.name)
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def output_dir(final: str | os.PathLike[str], *, is_ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Fill a fresh temporary sibling of ``final``; on success it replaces ``final`` whole.

    ``final`` is checked first (``check_output_dir``), so nothing is written for
    a refused target; on any error the temporary directory is removed and
    ``final`` is left as it was.
    """
    final = check_output_dir(Path(final), is_ours=is_ours, what=what)
    tmp = make_temp_dir(final.parent, prefix=f".tmp-{final.name}-")
    try:
        yield tmp
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
