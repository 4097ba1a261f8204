"""The processes of one run and their collectives (:class:`Replicas`).

**One collective per outer step.** DDP does not synchronise gradients taken with
``torch.autograd.grad`` or double backward and FSDP has no double backward, so the run shares out
*tasks*: the meta-batch of step ``t`` is defined without reference to the processes
(:class:`~bilevel.data.TaskSampler`: task ``i`` comes from a generator seeded by ``(seed, t, i)``),
each rank draws its share (:func:`~bilevel.app.distributed.launch.task_share`), and
:meth:`Replicas.reduce_step` reduces the meta-step with one ``all_reduce`` of a flat buffer
(:mod:`bilevel.app.distributed.pack`); the identity error is recomputed from the reduced terms
and total. Every rank applies the same reduced update, so parameters, optimiser state, the
algorithm's state (counters, noise generators, which draw for the whole meta-batch) and the
sampler's position stay identical on every rank; :meth:`Replicas.check_replicas` verifies it
every ``dist.check_every`` steps.

**Writing.** Rank 0 holds the run directory and writes the config, checkpoints, TensorBoard and
``metrics.json``; it reads the checkpoint to resume and settles the execution path, and its
outcome (or its error) is broadcast (:meth:`Replicas.first`). The other ranks write nothing
(their stdout is silenced; errors still reach stderr: :class:`Quiet`). A checkpoint holds no
world-size-specific state, so a run may resume on another number of processes.

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

from bilevel.algorithm import MetaStep
from bilevel.app.distributed.launch import Launch
from bilevel.app.distributed.pack import Pack, map_leaves
from bilevel.app.lifecycle.run_dir import RunDirectory
from bilevel.app.lifecycle.signals import GracefulStop
from bilevel.data.batch import TaskBatch, task_position
from bilevel.decomposition.checks import identity_error
from bilevel.decomposition.record import Decomposition
from bilevel.decomposition.reduction import MAX, MEAN, ROWS, reduce_fields
from bilevel.errors import BilevelError, DistributedError

T = TypeVar("T")


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
    def _reduced(self, batch: TaskBatch, plan: Callable[[Pack], Any], dtype: torch.dtype, what: str) -> Any:
        first, total = task_position(batch)
        pack = Pack(self.launch, first, batch.support_y.shape[0], total)
        slots = plan(pack)
        flat = pack.buffer(dtype)
        self._collective(what, lambda: dist.all_reduce(flat))
        return map_leaves(pack.value, slots)

    def reduce_step(self, result: MetaStep, batch: TaskBatch,
                    stop: GracefulStop) -> tuple[MetaStep, Optional[Union[TaskBatch, GatheredLabels]]]:
        """The meta-step and labels of the whole meta-batch from this rank's share ``batch`` (one
        ``all_reduce``, :mod:`bilevel.app.distributed.pack`; every field reduced as its type declares, ``REDUCTION``).
        The labels are ``batch`` itself with one process, :class:`GatheredLabels` on decomposition
        steps, else None. Also agrees on stopping: the largest signal any rank had received when
        it packed this step (:meth:`stop_signal`), so every rank stops after the same step."""
        if not self.launch.distributed:
            return result, batch
        decomposition = result.decomposition

        def plan(pack: Pack) -> dict[str, Any]:
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
