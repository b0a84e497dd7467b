"""One owner per directory: an OS lock on DIR/.lock, and children that die with their parent.

    with lock_directory(run_dir, "run directory"):    # UserError if another process holds it
        ...                                           # this process alone writes run_dir

    subprocess.Popen(cmd, preexec_fn=die_with_parent)  # the child gets SIGTERM when its parent dies

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on DIR/.lock, held for the life of the open file: the
kernel releases it when the owner exits in any way (kill -9 included), so a crash never leaves a
stale lock. The lock file holds the owner's pid, which the refusal names. It is removed on a normal
release; a lock file left by a killed owner is reused by the next owner (its content is not trusted,
only the flock is). After taking the lock the owner checks that the path still names the file it
locked, so removing the file on release cannot let two processes both believe they own DIR.

`die_with_parent()` asks Linux (prctl PR_SET_PDEATHSIG) to send this process a signal when the
thread that started it exits; `tcompare compare` runs it in each trainer it starts, so trainers
never outlive a killed comparison (SIGTERM: the trainer checkpoints its current step and exits).
It is a no-op on other systems.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from transformer_comparison.errors import UserError

LOCK_FILE = ".lock"
PR_SET_PDEATHSIG = 1


class DirectoryLock:
    """An exclusive lock on a directory, held from `acquire()` until `release()` (or process exit)."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "directory") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock, or raise UserError naming the directory and the owner's pid. The directory must exist."""
        if self._fd is not None:
            return self
        while True:
            fd = _open_lock_file(self.path, self.what)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                owner = _read_owner(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f"pid {owner}" if owner else "another process"
                    raise UserError(f"{self.what} {self.directory} is in use by {who} (another tcompare writes it); "
                                    "wait for it to finish or stop it, or choose another directory") from None
                raise UserError(f"cannot lock {self.path}: {error.strerror or error}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous owner removed the file between our open and our flock: try again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (closing the file releases the flock)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextlib.contextmanager
def lock_directory(directory: str | os.PathLike[str], what: str = "directory") -> Iterator[DirectoryLock]:
    """Hold the lock on an existing `directory` for the body of the with-statement."""
    lock = DirectoryLock(directory, what).acquire()
    try:
        yield lock
    finally:
        lock.release()


def lock_owner(directory: str | os.PathLike[str]) -> int | None:
    """The pid of the process holding the directory's lock, or None when nobody holds it."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_owner(fd) or -1
    finally:
        os.close(fd)
    return None


# looked up once at import: find_library may run ldconfig, which a forked child of a threaded
# process (die_with_parent runs between fork and exec) must not do
_LIBC = (ctypes.util.find_library("c") or "libc.so.6") if sys.platform.startswith("linux") else ""


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux; a no-op elsewhere).

    Meant as `subprocess.Popen(..., preexec_fn=die_with_parent)`: it runs in the child before exec,
    and the setting survives exec. If the parent already died before the call, signal now.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(_LIBC, use_errno=True)
    parent = os.getppid()
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


def _open_lock_file(path: Path, what: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise UserError(f"{what} {path.parent} does not exist") from None
    except NotADirectoryError:
        raise UserError(f"{what} {path.parent} is not a directory") from None
    except OSError as error:
        raise UserError(f"cannot create the lock file {path}: {error.strerror or error}") from None


def _read_owner(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
