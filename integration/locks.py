"""One writer at a time: OS file locks on a QuPath project and on a run folder.

Every histosynth writer of a project (the native writer, the paquo writer) holds
:func:`project_lock` from reading the project for its plan until the project is saved;
a run's writer (``RunWriter``) holds :func:`folder_lock` on the run folder while it is
open. A second writer waits up to ``wait_s`` seconds and then refuses with one line
naming the holder; it never touches the other's files.

The lock is a POSIX record lock (``fcntl.lockf``; ``msvcrt.locking`` on Windows) on
``P/.histosynth-project.lock`` (``RUN/.histosynth-run.lock``) — the kind Java's
``FileChannel.lock`` takes too. The
operating system drops it when its process ends, however it ends, so the lock of a
killed process is simply taken over (its holder record is logged). The lock file holds
the holder's pid, host, command and start time; the holder removes it on release (while
still holding it; a waiter that then finds the path no longer names its file starts
over), so a project that is not being written has no lock file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from histosynth.integration.errors import InputError

__all__ = ["LOCK_NAME", "RUN_LOCK_NAME", "ProjectLockedError", "folder_lock", "project_lock"]

log = logging.getLogger("histosynth")

#: The lock file's name, in the project folder.
LOCK_NAME = ".histosynth-project.lock"
#: The run folder's lock file.
RUN_LOCK_NAME = ".histosynth-run.lock"
#: Seconds between two tries while waiting for the lock.
POLL_S = 0.1

_held: dict[str, int] = {}  # lock path → depth of this process's nested holds
_guard = threading.Lock()


class ProjectLockedError(InputError):
    """Another process holds the lock of the project (or run folder), after waiting if
    asked to."""


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - not run on CI
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.lockf(fd, fcntl.LOCK_UN)


def _holder(fd: int) -> dict[str, Any]:
    """The holder record in the lock file, read through ``fd``: opening and closing the
    file anew would drop this process's POSIX locks on it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        value = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    when = (
        time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    )
    command = holder.get("command") or "?"
    return (
        f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({command!r}, since {when})"
    )


def _record(fd: int, purpose: str) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": purpose or " ".join(sys.argv[:6]),
        "since": time.time(),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode("utf-8"))
    os.fsync(fd)


def project_lock(
    project_file: str | os.PathLike, *, wait_s: float = 0.0, purpose: str = ""
) -> contextlib.AbstractContextManager[Path]:
    """Hold the write lock of the project whose file is ``project_file``.

    Waits up to ``wait_s`` seconds for another holder; then raises
    :class:`ProjectLockedError` naming it. Re-entrant within one process (a nested hold
    is free and releases nothing). ``purpose`` is recorded for the message another
    writer sees (default: this command line). Yields the lock file's path.
    """
    return folder_lock(
        Path(project_file).resolve().parent,
        LOCK_NAME,
        "the project",
        "the QuPath project folder",
        wait_s=wait_s,
        purpose=purpose,
        report=Path(project_file),
    )


@contextlib.contextmanager
def folder_lock(
    folder: Path,
    name: str,
    what: str,
    folder_what: str,
    *,
    wait_s: float = 0.0,
    purpose: str = "",
    report: Path | None = None,
) -> Iterator[Path]:
    """Hold the lock file ``folder/name``; ``what`` names the locked thing in the
    refusal ("the project"), ``folder_what`` the folder when it is read-only, ``report``
    the path the refusal names (default: the folder). Otherwise as :func:`project_lock`."""
    folder = Path(folder).resolve()
    path = folder / name
    key = str(path)
    with _guard:
        if _held.get(key):
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _guard:
                _held[key] -= 1
        return
    deadline = time.monotonic() + max(0.0, float(wait_s))
    fd = _acquire(path, folder, deadline, wait_s, report or folder, what, folder_what)
    try:
        stale = _holder(fd)
        if stale and stale.get("pid") != os.getpid():
            log.info("%s: took over the lock left by %s, which has ended", path, _describe(stale))
        _record(fd, purpose)
        with _guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _guard:
                _held.pop(key, None)
            # removed while still held: a process that opened it meanwhile finds, once it
            # has the lock, that the path no longer names its file, and starts over
            with contextlib.suppress(OSError):
                os.unlink(path)
            _unlock(fd)
    finally:
        os.close(fd)


def _open(path: Path, folder: Path, folder_what: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise InputError(
                f"{folder_what} is read-only ({exc.strerror}); nothing was written",
                path=folder,
            ) from None
        raise InputError(f"cannot create the lock file: {exc.strerror or exc}", path=path) from None


def _acquire(
    path: Path,
    folder: Path,
    deadline: float,
    wait_s: float,
    report: Path,
    what: str,
    folder_what: str,
) -> int:
    """A locked descriptor of the file at ``path`` (which the path still names)."""
    while True:
        fd = _open(path, folder, folder_what)
        try:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait_s:g} s" if wait_s else ""
                    raise ProjectLockedError(
                        f"{what} is being written by {_describe(_holder(fd))}{waited}; "
                        "try again when it is done, or pass --wait SECONDS",
                        path=report,
                    )
                time.sleep(POLL_S)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # its holder removed it on release: lock the file there now
