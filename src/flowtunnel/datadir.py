"""Private state directories and their single-owner lock: the gateway's data directory, the agent's spool.

They hold datagrams in clear (journal, spool, store) and every agent's key (registry), so they are created
private (directories 0700, files 0600) from the start, and a directory that someone else owns or may write
to is refused rather than used: another user could read the data or plant files the process would trust.
Exactly once into the journal and the store depends on a single writer, so a process that owns such a
directory holds an exclusive ``fcntl`` lock on a file inside it for its lifetime (``DirLock``); a second one
is refused with the holder's PID. ``sink`` processes keep their own directories private the same way
(``flowtunnel.sinkrunner``); a second writer of a sink's store is refused by DuckDB's own file lock.

Error handling: every refusal is a ``ConfigError`` with one line naming the directory, what is wrong with it
and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from pathlib import Path
from types import TracebackType

from flowtunnel.errors import ConfigError

__all__ = ["DirLock", "PrivateUmask", "create_private_file", "prepare_private_dir"]

#: Directory and file modes of everything created in a private directory.
DIR_MODE = 0o700
FILE_MODE = 0o600
#: How deep ``prepare_private_dir`` tightens what an older version left readable (DATA/store/x: depth 2).
_TIGHTEN_DEPTH = 2


def prepare_private_dir(path: Path, *, what: str) -> None:
    """Create ``path`` (mode 0700), or check an existing one and tighten what it holds.

    An existing directory must belong to this process's effective user and must not be writable by group or
    others; then it is made 0700, and the files and directories it holds (two levels deep) that this user
    owns lose their group and other bits (the state an older version left with the umask's 0644/0755).

    Error handling: ``ConfigError`` naming ``what`` and ``path`` when it cannot be created, is not a
    directory, belongs to another user or is group/other-writable.
    """
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise ConfigError(
            f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {euid}): refusing it "
            "(run as its owner, or give this user a directory of its own)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"{what} {path} is writable by group or others (mode {mode:04o}): refusing it "
            f"(check what it holds, then chmod 700 {path})"
        )
    if mode != DIR_MODE:
        # Best effort: only read bits are left here (a read-only file system refuses the chmod, and then
        # the first write names the real problem).
        with contextlib.suppress(OSError):
            os.chmod(path, DIR_MODE)
    _tighten(path, euid, _TIGHTEN_DEPTH)


def _tighten(directory: Path, euid: int, depth: int) -> None:
    """Drop group/other bits from what ``euid`` owns below ``directory`` (symlinks are left alone)."""
    try:
        children = list(os.scandir(directory))
    except OSError:
        return
    for child in children:
        with contextlib.suppress(OSError):
            st = child.stat(follow_symlinks=False)
            if st.st_uid != euid or not stat.S_IMODE(st.st_mode) & 0o077:
                if stat.S_ISDIR(st.st_mode) and depth > 1:
                    _tighten(Path(child.path), euid, depth - 1)
                continue
            if stat.S_ISDIR(st.st_mode):
                os.chmod(child.path, stat.S_IMODE(st.st_mode) & 0o700)
                if depth > 1:
                    _tighten(Path(child.path), euid, depth - 1)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                os.chmod(child.path, stat.S_IMODE(st.st_mode) & 0o700)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (SQLite then gives its -wal, -shm and
    -journal files the database file's mode); an existing file is left as it is.

    Error handling: ``ConfigError`` naming the file when it cannot be created (read-only file system, full
    disk, no rights)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from None
    os.close(fd)


class PrivateUmask:
    """Umask 077 for the process while at least one holder is active: files that libraries create on their
    own (DuckDB's database and WAL, temporary files) are then 0600 too.

    The umask is per process, so holders are counted: the first ``acquire`` saves the previous value, the
    last ``release`` restores it (several gateways may run in one test process).
    """

    _lock = threading.Lock()
    _holders = 0
    _saved = 0

    def __init__(self) -> None:
        self._held = False

    def acquire(self) -> None:
        with PrivateUmask._lock:
            if self._held:
                return
            if PrivateUmask._holders == 0:
                PrivateUmask._saved = os.umask(0o077)
            PrivateUmask._holders += 1
            self._held = True

    def release(self) -> None:
        with PrivateUmask._lock:
            if not self._held:
                return
            self._held = False
            PrivateUmask._holders -= 1
            if PrivateUmask._holders == 0:
                os.umask(PrivateUmask._saved)

    def __enter__(self) -> PrivateUmask:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DirLock:
    """An exclusive ``fcntl.flock`` on ``DIR/NAME``, holding the owner's PID, for one process's lifetime.

    ``DirLock.acquire(directory, "gateway.lock", what="gateway")``; ``release()`` (or ``with``) when done.
    The kernel drops the lock when the process dies, so a crash never leaves a stale lock behind; the PID in
    the file is only there to name the holder. ``flock`` locks belong to the open file, so a second
    ``acquire`` in the same process is refused too.

    Error handling: ``ConfigError`` "<directory> is in use by another <what> (pid N)" when held; a
    ``ConfigError`` naming the file when it cannot be created or opened (read-only file system, no rights).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, name: str, *, what: str) -> DirLock:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise ConfigError(f"cannot open lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"{directory} is in use by another {what} (pid {holder}, lock {path}): stop it first"
                ) from None
            raise ConfigError(f"cannot lock {path}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the PID; a refused second process then says "pid ?"
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close (the file stays: removing it would race with a process about to lock it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DirLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirLock({str(self.path)!r}, held={self.held})"


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "?"
    return text if text.isascii() and text.isdigit() else "?"
