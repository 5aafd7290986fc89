"""Careful file I/O for a root agent: atomic replace, an exclusive lock, and no symlink following.

Everything below a hosts dir is opened relative to a directory file descriptor with O_NOFOLLOW,
so a registry dir or hosts.toml that is a symlink can never redirect a write out of the hosts dir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from spegel_node.errors import Refused, denied_to_non_root, needs_root_hint

TMP_PREFIX = ".spegel-node-tmp-"
FILE_MODE = 0o644
DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def refuse_os_error(err: OSError, what: str) -> Refused:
    """A one-line, operator-facing message for a failed filesystem operation."""
    reason = {
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on device",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ELOOP: "is a symlink (refusing to follow it)",
        errno.ENOTDIR: "is not a directory",
        errno.EISDIR: "is a directory",
    }.get(err.errno or 0, err.strerror or str(err))
    if denied_to_non_root(err):
        return Refused(f"cannot {what}: {reason}: {needs_root_hint()}")
    return Refused(f"cannot {what}: {reason}")


@contextlib.contextmanager
def open_dir(path: Path) -> Iterator[int]:
    """A file descriptor for an existing directory (the path itself may be a symlink, e.g. /etc/x -> /y)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_subdir(parent_fd: int, name: str) -> Iterator[int]:
    """Open `name` under `parent_fd` as a directory, never through a symlink (ELOOP/ENOTDIR)."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_at(dir_fd: int, name: str, limit: int = 4 << 20) -> bytes | None:
    """Contents of a regular file `name` under `dir_fd`, None when absent; a symlink raises ELOOP."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EISDIR, "not a regular file", name)
        return f.read(limit + 1)


def read_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` + 1 (more means too large).

    The one capped reader for node files: opened without blocking, so a FIFO (or a device) in
    place of a config file fails at once instead of hanging; FileNotFoundError when absent,
    IsADirectoryError for a directory, OSError "not a regular file" for anything else.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def mkdir_at(parent_fd: int, name: str) -> None:
    os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
    with open_subdir(parent_fd, name) as fd:
        os.fchmod(fd, DIR_MODE)  # whatever the umask
    os.fsync(parent_fd)


def write_atomic_at(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int = FILE_MODE,
    *,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace `name` under `dir_fd` with `data`: temp file in the same dir, fsync, rename, fsync dir.

    Readers see the old or the new contents, never a torn file; on any error the temp file is removed.
    `owner` (uid, gid): give the new file this owner, e.g. the one of the file it replaces.
    """
    tmp = f"{TMP_PREFIX}{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        try:
            st = os.fstat(fd)
            if owner is not None and (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)  # only then: it needs CAP_CHOWN for another user's file
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED = _Unchecked()  # replace_at: write whatever the file holds now


def replace_at(
    dir_fd: int,
    name: str,
    before: bytes | _Unchecked | None,
    after: bytes | None,
    *,
    mode: int | None = None,
    limit: int = 4 << 20,
    replace_link: bool = False,
) -> bool:
    """The one way a planned change is carried out: `name` under `dir_fd` goes from `before` to
    `after` (None: deleted), atomically, never through a symlink.

    False, and nothing touched, when the file no longer holds `before` (someone wrote it since
    it was read); UNCHECKED skips that comparison. `mode` None keeps the mode and owner of the
    file replaced (FILE_MODE for a new file); a given `mode` is forced. `replace_link`: a
    symlink in the way reads as absent and is replaced by the file, not followed.
    """
    remove_stale_temp_files(dir_fd)  # of a run killed mid-write
    if not isinstance(before, _Unchecked):
        try:
            current = read_at(dir_fd, name, limit)
        except OSError as e:
            if not (replace_link and e.errno in (errno.ELOOP, errno.EISDIR)):
                raise
            current = None
        if current != before:
            return False
    if after is None:
        unlink_at(dir_fd, name)
        return True
    kept_mode, owner = mode_and_owner_at(dir_fd, name)
    write_atomic_at(dir_fd, name, after, kept_mode if mode is None else mode, owner=owner)
    return True


def mode_and_owner_at(dir_fd: int, name: str) -> tuple[int, tuple[int, int] | None]:
    """The permission bits and owner of the regular file `name` (to keep them when replacing
    it: a person's 0600 file with credentials stays 0600); FILE_MODE and None when absent."""
    st = lstat_at(dir_fd, name)
    if st is None or not stat.S_ISREG(st.st_mode):
        return FILE_MODE, None
    return stat.S_IMODE(st.st_mode) & 0o777, (st.st_uid, st.st_gid)


def unlink_at(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    os.fsync(dir_fd)


def rmdir_if_empty_at(parent_fd: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            return False
        raise
    os.fsync(parent_fd)
    return True


def remove_stale_temp_files(dir_fd: int) -> None:
    """Temp files left by a process killed mid-write (their pid no longer runs)."""
    for entry in os.listdir(dir_fd):
        if entry.startswith(TMP_PREFIX):
            pid = entry.rsplit(".", 1)[-1]
            if not pid.isdigit() or not Path(f"/proc/{pid}").exists() or int(pid) == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(entry, dir_fd=dir_fd)


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """Create `path` with `mode` and its missing parents with DIR_MODE, whatever the umask."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:  # made meanwhile by a concurrent run
            continue
        os.chmod(d, mode if d == path else DIR_MODE)


def ensure_private_dir(path: Path) -> None:
    """Create a root-only directory (0700) with its parents, e.g. the state dir."""
    make_dirs(path, 0o700)
    if path.is_symlink():
        raise Refused(f"cannot use {path}: it is a symlink")
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600); a second apply waits for the first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
