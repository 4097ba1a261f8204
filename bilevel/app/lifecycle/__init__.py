"""A run's life on disk and in the process, from its start to its end or its resumption.

* :mod:`~bilevel.app.lifecycle.run_dir` — the run directory, held by one process at a time
  (lock, stale temporary files, ``config.yaml`` written only once the run starts, ``metrics.json``);
* :mod:`~bilevel.app.lifecycle.checkpoint` — the last two checkpoints, atomic and checksummed;
* :mod:`~bilevel.app.lifecycle.resume` — the resume contract (the run's fingerprint) and the
  command that resumes a stopped run;
* :mod:`~bilevel.app.lifecycle.provenance` — the code a run ran, recorded in its ``config.yaml``;
* :mod:`~bilevel.app.lifecycle.signals` — a graceful stop on SIGINT/SIGTERM;
* :mod:`~bilevel.app.lifecycle.console`, :mod:`~bilevel.app.lifecycle.streams` — what the run prints,
  the ``train.log`` that keeps it, and a console whose reader has gone.
"""
from bilevel.app.lifecycle.checkpoint import LATEST, PREVIOUS, latest_checkpoint, load_checkpoint, save_checkpoint
from bilevel.app.lifecycle.console import BelowWarning, ConsoleHandler, log_file, log_started, silence_run_log
from bilevel.app.lifecycle.provenance import ENGINE_EPOCH, provenance
from bilevel.app.lifecycle.resume import check_resume, checkpoint_to_resume, fingerprint, resume_command
from bilevel.app.lifecycle.run_dir import RunDirectory, discard_unstarted
from bilevel.app.lifecycle.signals import GracefulStop
from bilevel.app.lifecycle.streams import survive_closed_console

__all__ = [
    "BelowWarning", "ConsoleHandler", "ENGINE_EPOCH", "GracefulStop", "LATEST", "PREVIOUS", "RunDirectory",
    "check_resume", "checkpoint_to_resume", "discard_unstarted", "fingerprint", "latest_checkpoint", "load_checkpoint",
    "log_file", "log_started", "provenance", "resume_command", "save_checkpoint", "silence_run_log",
    "survive_closed_console",
]
