"""One meta-training run over many processes (``torchrun``) with the result of one process.

**Launch.** ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``) starts the processes; :func:`detect_launch` reads where this one
sits. Without those variables, or with ``WORLD_SIZE=1``, nothing changes: one process, no
process group. ``dist.backend=auto`` is NCCL on CUDA (one GPU per process: ``cuda:LOCAL_RANK``)
and gloo on the CPU.

**Task parallelism, one collective per outer step.** DDP does not synchronise gradients taken
with ``torch.autograd.grad`` or double backward and FSDP has no double backward, so the run
shares out *tasks*: the meta-batch of step ``t`` is defined without reference to the processes
(:class:`~bilevel.data.TaskSampler`: task ``i`` comes from a generator seeded by
``(seed, t, i)``) and rank ``r`` of ``W`` draws the contiguous share :func:`task_share`
(sizes differ by at most one). Each rank's :class:`~bilevel.algorithm.MetaStep` holds means over
its ``n_r`` tasks; :meth:`Replicas.reduce_step` packs, into one flat buffer reduced by one
``all_reduce(SUM)``:

* means as sums ``n_r · ḡ_r``, divided by ``T = Σ_r n_r`` after the sum: the mean over all
  ``T`` tasks, whatever the split (meta-gradient, loss, accuracy, extras, every decomposition
  term and the total, the encoder-adaptation diagnostic);
* per-task matrices (pair weights, feature cosines, same-class masks, labels) at their global
  task rows of a zero ``[T, ...]`` block: the sum is a gather, exactly;
* non-negative maxima (the reconstruction error, the stop signal) at the rank's slot of a zero
  ``[W]`` block, the maximum taken after the sum: exact as well.

So the reduced decomposition is the single-process one up to the summation order of the means,
and its identity error is recomputed from the reduced terms and total. Every rank applies the
same reduced update, so parameters, optimiser state, the algorithm's state (counters, noise
generators, which draw for the whole meta-batch) and the sampler's position stay identical on
every rank; :meth:`Replicas.check_replicas` verifies it every ``dist.check_every`` steps.

**Writing.** Rank 0 holds the run directory and writes the config, checkpoints, TensorBoard and
``metrics.json``; it reads the checkpoint to resume and settles the execution path, and its
outcome (or its error) is broadcast (:meth:`Replicas.first`). The other ranks write nothing
(their stdout is silenced; errors still reach stderr). A checkpoint holds no world-size-specific
state, so a run may resume on another number of processes.

**Faults.** Every collective runs under ``dist.timeout_s``: a rank that dies or raises closes its
connections and the others' next collective fails at once; one that hangs makes it fail after
the timeout. The failure is a :class:`~bilevel.errors.DistributedError` (exit status 1) and the
process group is destroyed, so the process exits cleanly; ``torchrun --max-restarts=K`` then
restarts the group, which resumes from the last checkpoint (``train.resume=auto``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from contextlib import ExitStack, contextmanager, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, TypeVar, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_map

from bilevel.algorithm import MetaStep
from bilevel.data import TaskSampler
from bilevel.data.batch import TaskBatch, task_position
from bilevel.decomposition.checks import identity_error
from bilevel.decomposition.record import Decomposition
from bilevel.decomposition.reduction import MAX, MEAN, ROWS, reduce_fields
from bilevel.errors import BilevelError, ConfigError, DistributedError
from bilevel.primitives.params import Params
from bilevel.app.lifecycle.run_dir import RunDirectory
from bilevel.app.lifecycle.signals import GracefulStop

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


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


class GatheredLabels(NamedTuple):
    """The labels of a whole meta-batch, gathered from the ranks' shares: what the
    decomposition's figures read (``[T, n]`` each, and the number of ways)."""

    support_y: Tensor
    query_y: Tensor
    ways: int


class Quiet:
    """What a rank that writes nothing has in place of the run directory and the TensorBoard
    logger: ``path`` (the run directory's, for messages), and every method does nothing."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class _Slot:
    """Where one tensor's contribution lies in a :class:`_Pack` and how to read it back."""

    def __init__(self, start: int, shape: torch.Size, dtype: torch.dtype, read: Callable[[Tensor], Tensor]) -> None:
        self.start, self.shape, self.dtype, self.read = start, shape, dtype, read


class _Pack:
    """Contributions of one rank to a flat buffer summed across ranks (see the module
    docstring): :meth:`mean`, :meth:`rows` and :meth:`maximum` return slots; once the
    :meth:`buffer` has been summed, :meth:`value` reads each slot's reduced tensor. A tensor
    added twice (the same object, e.g. a decomposition's total that is also the meta-gradient)
    takes one slot."""

    def __init__(self, launch: Launch, first: int, tasks: int, total: int) -> None:
        self.launch, self.first, self.tasks, self.total = launch, first, tasks, total
        self._parts: list[Tensor] = []
        self._slots: dict[int, _Slot] = {}
        self._sources: list[Tensor] = []  # kept alive, so that their ids, the slots' keys, stay theirs
        self._size = 0
        self._flat: Optional[Tensor] = None

    def _add(self, tensor: Tensor, contribution: Tensor, read: Callable[[Tensor], Tensor]) -> _Slot:
        slot = self._slots.get(id(tensor))
        if slot is None:
            slot = _Slot(self._size, contribution.shape, tensor.dtype, read)
            self._slots[id(tensor)] = slot
            self._sources.append(tensor)
            self._parts.append(contribution.reshape(-1))
            self._size += contribution.numel()
        return slot

    def mean(self, tensor: Tensor) -> _Slot:
        """A mean over this rank's tasks → the mean over all tasks of the meta-batch."""
        return self._add(tensor, tensor.detach() * self.tasks, lambda summed: summed / self.total)

    def rows(self, tensor: Tensor) -> _Slot:
        """A per-task tensor ``[n_r, ...]`` → ``[T, ...]`` over the whole meta-batch (a gather)."""
        if tensor.shape[0] != self.tasks:
            raise ValueError(f"a per-task tensor of shape {tuple(tensor.shape)} does not have this rank's "
                             f"{self.tasks} tasks on its first axis")
        block = tensor.new_zeros((self.total, *tensor.shape[1:]), dtype=torch.float64)  # holds masks and labels
        block[self.first: self.first + self.tasks] = tensor.detach()
        return self._add(tensor, block, lambda summed: summed)

    def maximum(self, tensor: Tensor) -> _Slot:
        """A non-negative scalar → its maximum over the ranks."""
        block = tensor.new_zeros(self.launch.world, dtype=torch.float64)
        block[self.launch.rank] = tensor.detach()
        return self._add(tensor, block, lambda summed: summed.amax())

    def buffer(self, dtype: torch.dtype) -> Tensor:
        """The flat buffer of every contribution in ``dtype``; sum it across ranks in place."""
        self._flat = torch.cat([p.to(dtype) for p in self._parts])
        return self._flat

    def value(self, slot: _Slot) -> Tensor:
        """The reduced tensor of ``slot`` (in the dtype its tensor had)."""
        summed = self._flat[slot.start: slot.start + slot.shape.numel()].view(slot.shape)
        return slot.read(summed).to(slot.dtype)


class Replicas:
    """The processes of one run and their collectives; with one process every method is the
    identity (or does nothing), so the trainer calls them unconditionally.

    ``collective_seconds`` accumulates the wall time spent in collectives (benchmarks read it).
    """

    def __init__(self, launch: Launch, device: torch.device, backend: str, timeout_s: float, check_every: int) -> None:
        self.launch = launch
        self.device = device
        self.backend = backend
        self.timeout_s = timeout_s
        self.check_every = check_every
        self.collective_seconds = 0.0
        self._agreed_signum: Optional[int] = None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory."""
        return self.launch.writer

    # ------------------------------------------------------------------------------ process group
    def _collective(self, what: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        except RuntimeError as err:  # gloo/NCCL errors, store timeouts (DistError is a RuntimeError)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedError(
                f"rank {self.launch.rank} of {self.launch.world}: {what} failed ({reason}). Another process of "
                f"this run died, raised an error or did not answer within dist.timeout_s={self.timeout_s:g} s: its "
                "own output says why. This process stops too; the run directory keeps its last checkpoint, from "
                "which the same command continues (train.resume=auto; torchrun --max-restarts=K does it "
                "automatically)"
            ) from None
        finally:
            self.collective_seconds += time.perf_counter() - start

    def _join(self) -> None:
        """``init_process_group`` on the launcher's store (``env://``), under a prefix of its own
        per restart attempt: torchrun hands a restarted group the store of the failed one, whose
        keys would point the new processes at the dead ones' addresses."""
        timeout = timedelta(seconds=self.timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(self.backend, store=dist.PrefixStore(f"bilevel/attempt{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)

    @contextmanager
    def running(self, run_dir: Union[str, Path]) -> Iterator[Union[RunDirectory, Quiet]]:
        """The run's span: joins the process group (distributed runs), and yields the run
        directory — held by rank 0 (its lock and clean-up; its errors reach every rank), a
        :class:`Quiet` stand-in on the other ranks, whose stdout is silenced. The group is
        destroyed on the way out, whatever happened, so a failed run exits cleanly."""
        if not self.launch.distributed:
            with RunDirectory(run_dir) as directory:
                yield directory
            return
        with ExitStack() as stack:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self._collective("joining the process group", self._join)
            stack.callback(dist.destroy_process_group)
            if self.writer:
                directory: Union[RunDirectory, Quiet] = RunDirectory(run_dir)

                def hold() -> None:
                    stack.enter_context(directory)

                self.first(hold)
            else:
                self.first(lambda: None)
                directory = Quiet(run_dir)
                stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            yield directory

    def first(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0 only; its result on every rank. An actionable error it raises
        (:class:`~bilevel.errors.BilevelError`) is raised on every rank, with its message and
        exit status, so a refused start ends every process the same way."""
        if not self.launch.distributed:
            return work()
        box: list[Any] = [None]
        error: Optional[BilevelError] = None
        if self.writer:
            try:
                box[0] = ("value", work())
            except BilevelError as err:
                error, box[0] = err, ("error", str(err), err.exit_code)
        self._collective("sharing rank 0's start of the run", lambda: dist.broadcast_object_list(box, src=0))
        if error is not None:
            raise error
        kind, payload, *status = box[0]
        if kind == "error":
            raise DistributedError(payload, exit_code=status[0])
        return payload

    # ------------------------------------------------------------------------------ reductions
    def _reduced(self, batch: TaskBatch, plan: Callable[[_Pack], Any], dtype: torch.dtype, what: str) -> Any:
        first, total = task_position(batch)
        pack = _Pack(self.launch, first, batch.support_y.shape[0], total)
        slots = plan(pack)
        flat = pack.buffer(dtype)
        self._collective(what, lambda: dist.all_reduce(flat))
        return _map(pack.value, slots)

    def reduce_step(self, result: MetaStep, batch: TaskBatch,
                    stop: GracefulStop) -> tuple[MetaStep, Optional[Union[TaskBatch, GatheredLabels]]]:
        """The meta-step and labels of the whole meta-batch from this rank's share ``batch`` (one
        ``all_reduce``, module docstring; every field reduced as its type declares, ``REDUCTION``).
        The labels are ``batch`` itself with one process, :class:`GatheredLabels` on decomposition
        steps, else None. Also agrees on stopping: the largest signal any rank had received when
        it packed this step (:meth:`stop_signal`), so every rank stops after the same step."""
        if not self.launch.distributed:
            return result, batch
        decomposition = result.decomposition

        def plan(pack: _Pack) -> dict[str, Any]:
            reducers = {MEAN: pack.mean, ROWS: pack.rows, MAX: pack.maximum}
            slots: dict[str, Any] = {
                "step": reduce_fields(vars(result), MetaStep.REDUCTION, reducers),
                "signum": pack.maximum(torch.tensor(float(stop.signum or 0), device=result.loss.device)),
            }
            if decomposition is not None:
                slots["decomposition"] = reduce_fields(vars(decomposition), Decomposition.REDUCTION, reducers)
                slots["labels"] = (pack.rows(batch.support_y), pack.rows(batch.query_y))
            return slots

        dtype = next(iter(result.grad.values())).dtype
        reduced = self._reduced(batch, plan, dtype, "the reduction of the meta-step")
        self._agreed_signum = int(reduced["signum"]) or None
        labels = None
        if decomposition is not None:
            parts = reduced["decomposition"]
            decomposition = dataclasses.replace(
                decomposition, **parts, identity_error=identity_error(parts["terms"], parts["total"]))
            labels = GatheredLabels(*reduced["labels"], ways=batch.ways)
        return dataclasses.replace(result, **reduced["step"], decomposition=decomposition), labels

    def stop_signal(self, stop: GracefulStop) -> Optional[int]:
        """The signal the run stops for after this step: this process's own with one process;
        the one agreed by the last :meth:`reduce_step` otherwise (a signal that arrives later
        stops the run after the next step)."""
        return self._agreed_signum if self.launch.distributed else stop.signum

    def rows_over_tasks(self, rows: Tensor, batch: TaskBatch, seconds: float) -> tuple[Tensor, float]:
        """Per-task rows ``[n_r, ...]`` of this rank's share ``batch`` → the rows of the whole batch
        ``[T, ...]``, and the largest of the ranks' ``seconds`` (so a time budget settles the same
        task count everywhere); one ``all_reduce`` (evaluation)."""
        if not self.launch.distributed:
            return rows, seconds
        took = torch.tensor(float(seconds), dtype=torch.float64, device=rows.device)
        gathered, slowest = self._reduced(batch, lambda pack: (pack.rows(rows), pack.maximum(took)), torch.float64,
                                          "the gathering of an evaluation")
        return gathered, float(slowest)

    # ------------------------------------------------------------------------------ replica check
    def check_replicas(self, step: int, state: Callable[[], Mapping[str, Any]], ignore: tuple[str, ...] = ()) -> None:
        """Every ``dist.check_every`` steps (0: never): compare checksums of ``state()`` (the run's
        checkpoint state, without the ``ignore`` keys) across ranks with one small collective, and
        raise :class:`~bilevel.errors.DistributedError` naming the first entry that differs."""
        if not self.launch.distributed or not self.check_every or step % self.check_every:
            return
        sums = [(name, checksum(value)) for name, value in _leaves(state(), ignore)]
        gathered: list[Any] = [None] * self.launch.world
        self._collective(f"the replica check after step {step}", lambda: dist.all_gather_object(gathered, sums))
        for rank, other in enumerate(gathered):
            differ = [name for (name, a), (_, b) in zip(gathered[0], other) if a != b]
            if len(other) != len(gathered[0]) or differ:
                what = differ[0] if differ else "the structure of the run's state"
                raise DistributedError(
                    f"the processes of this run diverged: {what} differs between rank 0 and rank {rank} after step "
                    f"{step} (checked every dist.check_every={self.check_every} steps). Every rank must apply the "
                    "same update to the same state; a plugin that draws randomness for its own tasks only, or keeps "
                    "rank-dependent state, breaks that. The run was stopped; its last checkpoint is intact"
                )


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every leaf of a pytree of dicts, lists and tuples; None stays None."""
    return tree_map(lambda leaf: None if leaf is None else fn(leaf), tree)


def _leaves(tree: Any, ignore: tuple[str, ...], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(name, leaf)`` of a nested state, in order; parameters are named ``parameter <key>``."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if key in ignore and not prefix:
                continue
            name = f"parameter {key}" if prefix == "params" else f"{prefix}.{key}" if prefix else str(key)
            yield from _leaves(value, ignore, name)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _leaves(value, ignore, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def checksum(value: Any) -> str:
    """A short digest of ``value``'s exact contents (a tensor's bytes, dtype and shape; else its
    ``repr``): equal digests mean equal values, bit for bit."""
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()
