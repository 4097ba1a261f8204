"""A run directory, held by one process at a time.

Contents: ``config.yaml`` (the resolved config of the current attempt and, under ``provenance:``,
the code it ran: :func:`bilevel.app.lifecycle.provenance.provenance`; earlier attempts' differing records
are kept as ``config.1.yaml``, ``config.2.yaml``, ...), ``checkpoint.pt`` and
``checkpoint.prev.pt`` (:mod:`bilevel.app.lifecycle.checkpoint`), ``tb/`` (TensorBoard), ``metrics.json``
(written last, by a run that finished) and ``run.lock`` while a run holds it.

Invariants: entering takes the lock without waiting — an ``flock`` on the directory and on
``run.lock`` (:class:`~bilevel.files.DirectoryLock`: deleting ``run.lock`` lets no second run
in) — so a second run in the same directory fails at start with
:class:`~bilevel.errors.RunDirectoryBusy`, naming the holder; and it removes the temporary files of
writes that were killed. A path that cannot be a run directory (a file, a read-only place) is a
:class:`~bilevel.errors.ConfigError` before anything is written. Nothing else is touched until
:meth:`RunDirectory.begin`, which the trainer calls only once the run is known to start
(config valid, resume contract met): so a refused run leaves the directory's record as it was.
"""
from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Optional

import yaml

from bilevel.app.lifecycle.checkpoint import latest_checkpoint
from bilevel.app.lifecycle.provenance import provenance
from bilevel.errors import ConfigError, RunDirectoryBusy
from bilevel.files import DirectoryLock, atomic_write_text, storage_error, temp_files
from bilevel.run_files import CONFIG, METRICS, PROVENANCE

LOCK = "run.lock"
LOG = "train.log"


def _without_comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


class RunDirectory:
    """Context manager over a run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = DirectoryLock(self.path, LOCK)

    def __enter__(self) -> "RunDirectory":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            taken = self._lock.acquire(blocking=False)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise storage_error(err) from None
            raise ConfigError(f"cannot use {self.path} as the run directory: {err.strerror or err} "
                              f"({err.filename}). Choose a directory this user can create and write "
                              f"(hydra.run.dir=DIR)") from None
        if not taken:
            raise RunDirectoryBusy(
                f"run directory {self.path} is in use by another run ({self._lock.holder()}); wait for it to "
                "finish or choose another hydra.run.dir. (The lock is released when its holder exits, even "
                "when it is killed.)"
            )
        for tmp in temp_files(self.path):
            tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @property
    def checkpoint(self) -> Optional[Path]:
        """The checkpoint a run here would continue (:func:`bilevel.app.lifecycle.checkpoint.latest_checkpoint`)."""
        return latest_checkpoint(self.path)

    def begin(self, config_yaml: str, note: str) -> None:
        """Start an attempt: keep an earlier ``config.yaml`` whose record differs as
        ``config.<n>.yaml``, write this attempt's (``note`` as a comment on its first line, the
        :data:`PROVENANCE` block last), and remove the ``metrics.json`` a finished or interrupted
        attempt left."""
        config = self.path / CONFIG
        config_yaml += yaml.safe_dump({PROVENANCE: provenance()}, sort_keys=False)
        if config.exists() and _without_comments(config.read_text()) != _without_comments(config_yaml):
            taken = [int(m.group(1)) for p in self.path.glob("config.*.yaml")
                     if (m := re.fullmatch(r"config\.(\d+)\.yaml", p.name))]
            config.replace(self.path / f"config.{max(taken, default=0) + 1}.yaml")
        atomic_write_text(f"# {note}\n{config_yaml}", config)
        (self.path / METRICS).unlink(missing_ok=True)

    def write_metrics(self, metrics: dict[str, float]) -> None:
        """Write ``metrics.json`` (atomically): the last act of a finished run."""
        atomic_write_text(json.dumps(metrics, indent=2), self.path / METRICS)


def discard_unstarted(path: str | Path, within: str | Path) -> bool:
    """Remove the directory of a run that was refused before it started: only when it holds
    nothing but a lock (which this process can take: no live run holds it) and a log, then its
    parents that are left empty, up to but excluding ``within`` (only inside ``within``).
    Returns whether ``path`` was removed."""
    path, within = Path(path).resolve(), Path(within).resolve()
    if not path.is_dir() or any(p.name not in (LOCK, LOG) for p in path.iterdir()):
        return False
    lock = DirectoryLock(path, LOCK)
    if not lock.acquire(blocking=False):
        return False
    try:
        for name in (LOCK, LOG):
            (path / name).unlink(missing_ok=True)
    finally:
        lock.release()
    path.rmdir()
    parent = path.parent
    while parent != within and within in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True
