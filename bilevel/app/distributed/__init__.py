"""One meta-training run over many processes (``torchrun``) with the result of one process.

* :mod:`~bilevel.app.distributed.launch` — where this process sits (:class:`Launch`), its share of
  every meta-batch (:func:`task_share`), and what a launch cannot run, refused before any work;
* :mod:`~bilevel.app.distributed.replicas` — :class:`Replicas`: the process group, rank 0's start
  of the run shared with every rank, one reduction per outer step, the replica check, and a
  collective that fails (a dead or hung process) ending every process cleanly;
* :mod:`~bilevel.app.distributed.pack` — the flat buffer one ``all_reduce`` sums: means, per-task
  rows and maxima, each reduced exactly as its field declares.

With one process every method of :class:`Replicas` is the identity (or does nothing), so the
trainer calls them unconditionally (``docs/distributed.md``).
"""
from bilevel.app.distributed.launch import (
    Launch, check_command_line, check_launch, detect_launch, rank_device, resolve_backend, task_share, tasks_in_memory,
)
from bilevel.app.distributed.replicas import GatheredLabels, Quiet, Replicas, checksum

__all__ = [
    "GatheredLabels", "Launch", "Quiet", "Replicas", "check_command_line", "check_launch", "checksum", "detect_launch",
    "rank_device", "resolve_backend", "task_share", "tasks_in_memory",
]
