"""One writer per folder: an exclusive, non-blocking lock on `<folder>/.lock`.

    with exclusive(out_dir, "training run"):
        ...  # no other process holds out_dir until the block ends

The lock is an OS advisory lock on an open file (flock on POSIX, msvcrt.locking on Windows): the
kernel drops it when its holder exits in any way, kill -9 included, so a lock left by a dead
process needs no cleanup and never blocks the next run (a `.lock` file it leaves behind is taken
over as it is). The holder deletes `.lock` when it releases it, and removes the folders it created
when they are empty again (a run refused before writing anything leaves nothing behind). A process
that locked a `.lock` file which was deleted meanwhile sees that its inode is no longer the path's
and tries again, so deleting the file never lets two processes hold the folder. The lock is per
open file: two `exclusive` blocks on one folder in the same process exclude each other too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"
_ATTEMPTS = 20  # re-opens when the lock file is deleted or its folder removed under us


class FolderLocked(ValueError):
    """Another process holds the folder's lock (a second run into the same folder): one line naming
    the folder and what holds it. A ValueError, so the CLI exits with status 2."""


@contextmanager
def exclusive(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` (created if missing) for the block; yields the folder.

    Args:
        folder: the folder one process at a time may write (a shard folder, a training out_dir).
        what: what the folder holds, for the error, e.g. "training run", "sharded sampling run".

    Raises:
        FolderLocked (a ValueError) at once, without waiting, when another process holds it.
        OSError naming the path when the folder or its lock file cannot be created.
    """
    folder = Path(folder)
    created = _missing_folders(folder)
    fd = _acquire(folder, what)
    try:
        yield folder
    finally:
        try:
            (folder / LOCK_FILE).unlink(missing_ok=True)  # still held: nobody can take it meanwhile
        except OSError:  # e.g. a read-only folder, or Windows: the file stays, unlocked
            pass
        _unlock(fd)
        os.close(fd)
        for path in created:  # innermost first; stops at the first folder that is not empty
            try:
                path.rmdir()
            except OSError:
                break


def _acquire(folder: Path, what: str) -> int:
    path = folder / LOCK_FILE
    for _ in range(_ATTEMPTS):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a releasing holder removed the folder in between
            continue
        except OSError as err:
            if err.filename is None:
                err.filename = str(path)
            raise
        if not _try_lock(fd):
            os.close(fd)
            raise FolderLocked(f"{str(folder)!r} is in use: another process holds its {what} lock "
                               f"({LOCK_FILE}); wait for it to finish or use another folder")
        if _same_file(fd, path):
            return fd
        _unlock(fd)  # we locked a file its previous holder deleted on release: take the new one
        os.close(fd)
    raise OSError(f"could not lock {str(path)!r}: it kept being removed while locking it")


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, innermost first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
