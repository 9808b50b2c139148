"""Files inside a results folder, opened without following symbolic links.

Anyone who can write to a shared results folder could plant a link (`.lock -> ~/.bashrc`, `model_key=x -> /etc`);
a submit that follows it would overwrite what the link points to with the submitting user's rights. So below the
root (which the user names, and may be a link), every directory is opened relative to its parent's descriptor with
O_NOFOLLOW | O_DIRECTORY, every file with O_NOFOLLOW (and O_EXCL when created), and a file is replaced by renaming
within one directory descriptor: nothing is resolved by path twice, so a link swapped in meanwhile is not followed
either. Reading walks with os.fwalk, which does not descend into linked directories.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC   # NONBLOCK: a planted FIFO cannot hang us


class LinkRefused(OSError):
    """A path inside the results folder is a symbolic link, or not the kind of file expected there."""


def _refuse(path: Path, what: str) -> LinkRefused:
    return LinkRefused(errno.ELOOP, f"{path} is {what}; refusing to use it (remove it)")


@contextmanager
def root_fd(root: Path) -> Iterator[int]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def open_subdir(parent_fd: int, name: str, path: Path, create: bool) -> int:
    """Descriptor of directory `name` under `parent_fd` (made if `create`); LinkRefused for a link or a file."""
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if is_link(parent_fd, name) else "not a directory"
            raise _refuse(path, kind) from None
        raise


@contextmanager
def dir_fd(root: Path, parts: tuple[str, ...], create: bool) -> Iterator[int]:
    """Descriptor of root/parts[0]/parts[1]/..., each part opened without following links (the root itself is the
    user's choice: it is made when missing, and may be a link)."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    with root_fd(root) as fd:
        fds, current, path = [], fd, root
        try:
            for part in parts:
                path = path / part
                current = open_subdir(current, part, path, create)
                fds.append(current)
            yield current
        finally:
            for opened in fds:
                os.close(opened)


def is_link(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_regular(parent_fd: int, name: str, path: Path, flags: int = _READ, mode: int = 0o644) -> int:
    """Open a regular file without following a link; LinkRefused for a link, a FIFO, a device, a directory."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise _refuse(path, "a directory") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _refuse(path, "not a regular file")
    return fd


def write_atomic(parent_fd: int, name: str, path: Path, write: Callable[[object], None]) -> None:
    """`write(file)` into a new hidden temp file next to `name`, fsync, rename over `name` (which may be anything
    but a directory: a planted link is replaced, not followed), fsync the directory."""
    tmp = f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = open_regular(parent_fd, tmp, path.parent / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent_fd)
        except OSError:
            pass
        raise
    os.fsync(parent_fd)


def walk(root: Path) -> Iterator[tuple[str, list[str], list[str], int]]:
    """os.fwalk below `root` without following links, skipping hidden and "_" names (as pyarrow's discovery
    does): (relative dir, directory names, other names, dir fd). Linked directories come in the other names."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames, fd in os.fwalk(root, follow_symlinks=False):
        linked = [d for d in dirnames if is_link(fd, d)]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")) and d not in linked)
        names = sorted(n for n in filenames + linked if not n.startswith((".", "_")))
        yield os.path.relpath(dirpath, root), dirnames, names, fd


def hidden_temp_files(root: Path) -> Iterator[tuple[int, str]]:
    """(dir fd, name) of every hidden `*.tmp` below `root` (links not followed); valid only during the loop."""
    if not root.is_dir():
        return
    for _, dirnames, filenames, fd in os.fwalk(root, follow_symlinks=False):
        dirnames[:] = [d for d in dirnames if not is_link(fd, d)]
        for name in filenames:
            if name.startswith(".") and name.endswith(".tmp"):
                yield fd, name
