"""Files the framework writes and reads back: atomic writes, checksummed payloads, locks.

Invariants:

* An atomic write goes to a temporary file in the target's directory (``.<name>.<random>.tmp``,
  see :func:`temp_files`), is flushed and fsync'ed, then renamed over the target: a reader sees
  the old file or the new one, never a part. A killed writer leaves only the temporary file.
* A *checked* file is one header line ``BILEVEL <kind> <version> <size> <sha256>`` followed by
  the ``torch.save`` payload; :func:`load_checked` verifies all five before unpickling, so a
  truncated, empty, overwritten or foreign file is a :class:`~bilevel.errors.CorruptFileError`
  naming the file, never a pickle error.
* :class:`FileLock` is an advisory ``flock``: the kernel drops it when its holder dies (even by
  ``kill -9``), so a lock file left behind never blocks anyone; it records its holder's pid and
  host for the message of whoever has to wait. A lock whose record cannot be written (a full
  disk) is not taken and leaves no file. :class:`DirectoryLock` also locks the directory itself,
  so deleting the lock file while its holder runs lets no second holder in.
* An :class:`OSError` on a file of the run or the cache becomes a :class:`~bilevel.errors.StorageError`
  naming the file and what the system said (:func:`storage_error`); a checked file that is not a
  readable file (a directory in its place) is a :class:`~bilevel.errors.CorruptFileError`.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import io
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from bilevel.errors import ConfigError, CorruptFileError, StorageError

MAGIC = "BILEVEL"
TEMP_SUFFIX = ".tmp"


def cache_dir() -> Path:
    """The per-user cache: ``$BILEVEL_CACHE`` if set, else ``~/.cache/bilevel``."""
    return Path(os.environ.get("BILEVEL_CACHE") or Path.home() / ".cache" / "bilevel")


def check_cache_dir() -> Path:
    """The cache directory, refused (:class:`ConfigError`) when it, or the nearest part of its path
    that exists, is not a directory (``BILEVEL_CACHE`` naming a file)."""
    path = cache_dir()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        named = "BILEVEL_CACHE" if os.environ.get("BILEVEL_CACHE") else "the cache directory"
        raise ConfigError(f"{named}={path} cannot be a directory: {existing} is a file. Point BILEVEL_CACHE at a "
                          f"directory (it is made if missing), or unset it for ~/.cache/bilevel")
    return path


def storage_error(error: OSError) -> StorageError:
    """The :class:`StorageError` of a failed read or write: the file, what the system said, and
    what to do about the common causes."""
    where = f" {error.filename}" if error.filename is not None else ""
    return StorageError(f"could not write or read{where}: {error.strerror or error}. Free disk space or fix the "
                        f"path or its permissions; the run directory keeps its last checkpoint, if any")


def temp_files(directory: Path) -> list[Path]:
    """The temporary files that atomic writes in ``directory`` leave when they are killed."""
    return sorted(directory.glob(f".*{TEMP_SUFFIX}"))


def atomic_write_bytes(data: bytes, path: str | os.PathLike, keep_previous: Optional[Path] = None) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring). With ``keep_previous``,
    an existing ``path`` is moved there just before the new file takes its place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; caches are meant to be shared
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    atomic_write_bytes(text.encode(), path)


def save_checked(obj: Any, path: str | os.PathLike, kind: str, version: int, keep_previous: Optional[Path] = None) -> None:
    """``torch.save(obj)`` atomically, behind a header with ``kind``, ``version``, size and SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    header = f"{MAGIC} {kind} {version} {len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    atomic_write_bytes(header + payload, path, keep_previous)


def load_checked(path: str | os.PathLike, kind: str, version: int, map_location: Any = None,
                 weights_only: bool = False) -> Any:
    """Load a file written by :func:`save_checked`; :class:`CorruptFileError` (naming the file and
    what is wrong with it) unless kind, version, size and checksum all match."""
    path = Path(path)

    def corrupt(problem: str) -> CorruptFileError:
        return CorruptFileError(f"{path} is not a readable {kind} file: {problem}")

    try:
        data = path.read_bytes()
    except OSError as err:
        raise corrupt(err.strerror.lower() if err.strerror else str(err)) from None
    line, _, payload = data.partition(b"\n")
    fields = line.decode("ascii", errors="replace").split(" ")

    if len(fields) != 5 or fields[0] != MAGIC or fields[1] != kind:
        what = "it is empty" if not data else f"no '{MAGIC} {kind}' header (written by an older version, or overwritten)"
        raise corrupt(what)
    if fields[2] != str(version):
        raise corrupt(f"format version {fields[2]}, this code reads version {version}")
    if not fields[3].isdigit() or int(fields[3]) != len(payload):
        raise corrupt(f"truncated or extended: {len(payload)} payload bytes, the header says {fields[3]}")
    if hashlib.sha256(payload).hexdigest() != fields[4]:
        raise corrupt("SHA-256 mismatch (the file was modified after it was written)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)


class FileLock:
    """An exclusive advisory lock on ``path`` (see the module docstring).

    ``acquire(blocking=False)`` returns False when another process holds it; ``holder()`` then
    says who. Releasing removes the file; :meth:`acquire` re-checks that the file it locked is
    still the one at ``path``, so a holder that releases while another waits cannot lead to two
    holders.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it while we waited: lock the new one
        since = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        except OSError:
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise
        self._fd = fd
        return True

    gone = "a process that has just finished"
    """Who held the lock when its record is gone."""

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ('pid N on HOST since TIME')."""
        try:
            return self.path.read_text().strip() or "a process that is starting"
        except FileNotFoundError:
            return self.gone

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DirectoryLock(FileLock):
    """A :class:`FileLock` on ``directory/name`` that also holds an ``flock`` on the directory
    itself: the directory cannot be deleted while its holder works in it, so whoever deletes the
    lock file cannot let a second holder in (the second would lock a new file, but not the
    directory)."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        super().__init__(Path(directory) / name)
        self._dir_fd: Optional[int] = None
        self.gone = f"a process whose {name} record was deleted"  # the directory's flock is still held

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            taken = super().acquire(blocking)
        except BlockingIOError:
            taken = False
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
            return False
        self._dir_fd = fd
        return True

    def release(self) -> None:
        super().release()
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # closing the only descriptor drops its flock
            self._dir_fd = None


class KeptDirectory:
    """A writer (e.g. a TensorBoard ``SummaryWriter``, whose event file is reopened by path for
    every record) whose directory ``log_dir`` is made again, with one warning, when it was deleted
    while the run writes there: the run goes on (its checkpoints hold its state), the events
    written before the deletion are lost with the directory. Every other attribute is the writer's."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self._warned = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._writer, name)
        if not callable(attribute):
            return attribute

        def kept(*args: Any, **kwargs: Any) -> Any:
            directory = Path(self._writer.log_dir)
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                if not self._warned:
                    self._warned = True
                    logging.getLogger(__name__).warning(
                        f"warning: {directory} was deleted during the run; made it again (the events logged "
                        f"before are lost; the checkpoints are not affected)")
            return attribute(*args, **kwargs)

        return kept
