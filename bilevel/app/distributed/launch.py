"""Where this process sits in a run launched by ``torchrun`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``): :func:`detect_launch`. Without
those variables, or with ``WORLD_SIZE=1``, nothing changes: one process, no process group.
``dist.backend=auto`` is NCCL on CUDA (one GPU per process: ``cuda:LOCAL_RANK``) and gloo on the
CPU (:func:`resolve_backend`). Rank ``r`` of ``W`` draws the contiguous share :func:`task_share`
of every meta-batch (sizes differ by at most one). What a run of ``W`` processes cannot do is
refused before any work (:func:`check_launch`, :func:`check_command_line`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch

from bilevel.data import TaskSampler
from bilevel.errors import ConfigError

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process sits in its run: ``rank`` of ``world`` processes, ``local_rank`` of the
    ``local_world`` processes on its node. The default is a run of one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        """Whether the run has more than one process (and so a process group)."""
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

    def share(self, sampler: TaskSampler) -> TaskSampler:
        """``sampler`` drawing this process's share (:func:`task_share`) of every meta-batch."""
        return sampler.share(task_share(sampler.meta_batch, self.rank, self.world))


def detect_launch(environ: Mapping[str, str] = os.environ) -> Launch:
    """The :class:`Launch` a launcher described in ``environ`` (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``); one process when ``WORLD_SIZE`` is
    absent. A partial or inconsistent description is a :class:`ConfigError`."""
    if "WORLD_SIZE" not in environ:
        return Launch()
    missing = [name for name in LAUNCH_ENV if name not in environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start distributed runs with torchrun "
            "(torchrun --nproc_per_node=N -m bilevel.app.train ...), which sets all of them"
        )
    try:
        rank, world, local_rank = (int(environ[name]) for name in LAUNCH_ENV)
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as err:
        raise ConfigError(f"the launcher's environment is not a set of integers: {err}") from None
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise ConfigError(
            f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
            f"LOCAL_WORLD_SIZE={local_world}"
        )
    return Launch(rank, world, local_rank, local_world)


def check_command_line(argv: list[str], environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a ``bilevel-train`` command line that a distributed launch cannot run: every
    process must name the same run directory, which a restarted group must find again, so
    ``hydra.run.dir`` is required (the default holds the start time of each process); and a
    Hydra sweep (``-m``) starts its jobs in one process."""
    if not detect_launch(environ).distributed:
        return
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise ConfigError("a sweep (-m) cannot run under torchrun: start each run with torchrun, or sweep with a "
                          "Hydra launcher (hydra/launcher=joblib|submitit_slurm; docs/distributed.md)")
    if not any(arg.startswith("hydra.run.dir=") for arg in argv):
        raise ConfigError("under torchrun, set hydra.run.dir=DIR: every process must name the same run directory, "
                          "and a restarted group (torchrun --max-restarts) resumes from the checkpoint there; the "
                          "default directory holds each process's own start time")


def task_share(tasks: int, rank: int, world: int) -> range:
    """The contiguous tasks of ``range(tasks)`` that ``rank`` of ``world`` takes: as even as
    possible, the first ``tasks % world`` ranks taking one task more. The shares of all ranks,
    in rank order, are ``range(tasks)``."""
    base, extra = divmod(tasks, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def check_launch(launch: Launch, cfg: Any, device: torch.device) -> None:
    """Refuse (:class:`ConfigError`, before any work) what a run of ``launch.world`` processes
    cannot do: a meta-batch or an evaluation task set smaller than the world size, or more
    processes on a node than it has GPUs for a CUDA run."""
    if not launch.distributed:
        return
    for key, value in (("train.meta_batch", cfg.train.meta_batch), ("eval.tasks", cfg.eval.tasks),
                       ("eval.final_tasks", cfg.eval.final_tasks)):
        if value < launch.world:
            raise ConfigError(
                f"{key}={value} is smaller than the {launch.world} processes of this run: every process "
                f"needs at least one task; set {key} >= {launch.world} or start fewer processes"
            )
    if device.type == "cuda" and torch.cuda.device_count() < launch.local_world:
        raise ConfigError(
            f"device={cfg.device}: {launch.local_world} processes on this node need one GPU each, but torch sees "
            f"{torch.cuda.device_count()}; start at most {torch.cuda.device_count()} processes per node "
            "(torchrun --nproc_per_node=...) or use device=cpu"
        )


def resolve_backend(name: str, device: torch.device) -> str:
    """``dist.backend`` (one of :data:`~bilevel.app.config.schema.BACKENDS`): ``auto`` → NCCL on CUDA, gloo on
    the CPU; NCCL asked for on the CPU is a :class:`ConfigError`."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist.backend=nccl needs CUDA tensors, but this run is on {device.type}; "
                          "use dist.backend=gloo (or auto)")
    return name


def tasks_in_memory(launch: Launch, meta_batch: int, device: torch.device) -> int:
    """The most tasks of one meta-step held at once in ``device``'s memory: the largest share,
    times the processes of this node on the CPU (they share its memory; a GPU has one process)."""
    share = len(task_share(meta_batch, 0, launch.world))
    return share * (launch.local_world if device.type == "cpu" else 1)


def rank_device(launch: Launch, device: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for a distributed CUDA run, else ``device``."""
    return torch.device("cuda", launch.local_rank) if launch.distributed and device.type == "cuda" else device
