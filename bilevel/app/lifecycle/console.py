"""What ``bilevel-train`` prints, and the log file that keeps it.

Hydra's job logging (``configs/hydra/job_logging/bilevel.yaml``) sends the messages of a run
to the console — information to stdout, warnings and errors to stderr, each through
:class:`ConsoleHandler`, which clears and redraws the progress bars around a line — and all of
them, with time stamps, to ``train.log`` in the run directory. The file is opened at the
first message, which a run writes once it has started, so a refused start leaves no file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write`` (progress bars stay intact)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging's contract: report, never raise)
            self.handleError(record)


class BelowWarning(logging.Filter):
    """Passes records below WARNING (the stdout handler's share)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _file_handler(run_dir: Path) -> Optional[logging.FileHandler]:
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).parent.resolve() == run_dir.resolve():
            return handler
    return None


def log_file(run_dir: Path) -> Optional[Path]:
    """The log file the job logging writes into ``run_dir`` (None outside a Hydra run)."""
    handler = _file_handler(run_dir)
    return None if handler is None else Path(handler.baseFilename)


def log_started(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has written to its log file (it has started)."""
    handler = _file_handler(run_dir)
    return handler is not None and handler.stream is not None


def silence_run_log(run_dir: Path) -> None:
    """For a process that does not write the run (a rank other than 0 under ``torchrun``): drop
    the job logging's file handler for ``run_dir`` before it opens its file, and keep only
    warnings and errors on the console (rank 0 says the rest)."""
    root = logging.getLogger()
    handler = _file_handler(run_dir)
    if handler is not None:
        root.removeHandler(handler)
    for other in root.handlers:
        other.setLevel(max(other.level, logging.WARNING))
