"""How ``bilevel-train`` ends on an error: one paragraph without a traceback (unless
``HYDRA_FULL_ERROR=1``), the command that resumes a run that stopped, and the error's exit status
(2 for a configuration error, 130/143 for SIGINT/SIGTERM, else 1). A refused or interrupted start
leaves no run directory behind (:func:`~bilevel.app.lifecycle.run_dir.discard_unstarted`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from bilevel.app.config.catalog import unknown_algorithm_message
from bilevel.app.distributed.launch import detect_launch
from bilevel.app.lifecycle.checkpoint import latest_checkpoint
from bilevel.app.lifecycle.console import log_started
from bilevel.app.lifecycle.resume import resume_command
from bilevel.app.lifecycle.run_dir import discard_unstarted
from bilevel.errors import RunInterrupted, StorageError, UnknownAlgorithm

TRACEBACKS = {"shown": os.environ.get("HYDRA_FULL_ERROR") == "1"}
"""Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``), read before
:func:`bilevel.app.train.main` sets the variable for Hydra."""
log = logging.getLogger(__name__)


def exit_on(error: BaseException, run_dir: str) -> None:
    """Say ``error`` without a traceback (the resume command too when the run stopped, or when
    storage failed and a checkpoint is there to resume) and exit with its status; with
    ``HYDRA_FULL_ERROR=1`` re-raise it. A run that had started says it through its log (console
    and ``train.log``); a refused or interrupted start prints it and leaves no run directory behind
    (:func:`~bilevel.app.lifecycle.run_dir.discard_unstarted`). A further Ctrl-C meanwhile is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if TRACEBACKS["shown"]:
        raise error
    started = log_started(Path(run_dir))
    stopped = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    if isinstance(error, KeyboardInterrupt):
        message, status = ("interrupted by SIGINT; the run directory keeps its last checkpoint, if any" if started
                           else "interrupted by SIGINT before the run started; nothing was written"), 130
    elif isinstance(error, UnknownAlgorithm):  # the registry names its plugins; the catalog adds the presets
        message, status = unknown_algorithm_message(error.name, error.key), error.exit_code
    else:
        message, status = str(error), error.exit_code
    lines = [message if stopped else f"error: {message}"]
    if started and (stopped or (isinstance(error, StorageError) and latest_checkpoint(run_dir) is not None)):
        lines.append("resume with: " + resume_command(HydraConfig.get().overrides.task, run_dir))
    if started:
        log.error("\n".join(lines))
    else:
        print("\n".join(lines), file=sys.stderr, flush=True)
    if not started and detect_launch().writer:  # one process removes it, or they race
        discard_unstarted(run_dir, os.getcwd())
    sys.exit(status)
