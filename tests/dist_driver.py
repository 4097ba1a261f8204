"""``bilevel-train`` as one process of a distributed test run, with probes (used by ``test_distributed.py``).

    python tests/dist_driver.py [overrides...]          (under torchrun, or with RANK, WORLD_SIZE, ... set)

Probes, set by environment variables:

* ``BILEVEL_TEST_RECORD=DIR``: at exit the process writes ``DIR/rank<r>.pt`` (``torch.save`` of
  :meth:`Probe.record`): per training step the tasks it drew and what the trainer got back from the
  cross-process reduction (the step's meta-gradient, update, loss and decomposition), and every file
  it opened for writing or directory it created.
* ``BILEVEL_TEST_FAULT=RANK:STEP:WHAT``, on the first attempt only (``TORCHELASTIC_RESTART_COUNT``
  unset or 0): rank RANK, when it reaches the reduction of step STEP (STEP steps done), writes the
  time to ``DIR/fault_time`` and then kills itself (``KILL``), hangs (``STOP``: SIGSTOP), raises
  (``RAISE``), sends itself SIGTERM and goes on (``TERM``) or, after the reduction, adds 1e-3 to
  the first entry of its update (``DIVERGE``).

The same probes record a single-process run in the test's own process (:meth:`Probe.install`).
Run with ``BILEVEL_ALLOCATOR=default``: a re-exec under another allocator would drop the probes.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bilevel.decomposition.ablation import Ablation
from bilevel.app.distributed.replicas import Replicas


def _detached(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


class Probe:
    """Records a run's tasks, reduced meta-steps and writes; optionally injects one fault."""

    def __init__(self, rank: int = 0, fault: Optional[str] = None, record_dir: Optional[Path] = None) -> None:
        self.rank, self.record_dir = rank, record_dir
        self.tasks: list[tuple[int, torch.Tensor]] = []
        self.steps: list[dict[str, Any]] = []
        self.writes: list[str] = []
        self.fault = None
        if fault:
            who, step, what = fault.split(":")
            if int(who) == rank:
                self.fault = (int(step), what)

    def install(self, patch: Callable[[Any, str, Any], None]) -> None:
        """Wrap ``Ablation.step`` (the tasks of each step) and ``Replicas.reduce_step`` (what the
        trainer continues with); ``patch`` is ``setattr`` or pytest's ``monkeypatch.setattr``."""
        probe, step, reduce_step = self, Ablation.step, Replicas.reduce_step

        def recording_step(self, algorithm, params, batch, decompose):
            probe.tasks.append((batch.first_task, batch.classes.clone()))
            return step(self, algorithm, params, batch, decompose)

        def recording_reduce(self, result, batch, stop):
            fault = probe.fault is not None and probe.fault[0] == len(probe.steps)
            if fault and probe.fault[1] != "DIVERGE":
                probe.inject(probe.fault[1])
            result, labels = reduce_step(self, result, batch, stop)
            if fault and probe.fault[1] == "DIVERGE":
                first = next(iter(result.grad))
                result = dataclasses.replace(result, grad={**result.grad, first: result.grad[first] + 1e-3})
            d = result.decomposition
            probe.steps.append({
                "grad": _detached(result.grad), "loss": float(result.loss),
                "decomposition": None if d is None else {
                    "terms": _detached(d.terms), "total": _detached(d.total), "pair_weights": d.pair_weights.clone(),
                    "feature_cosines": d.feature_cosines.clone(), "same_class": d.same_class.clone(),
                    "reconstruction_error": float(d.reconstruction_error), "identity_error": float(d.identity_error),
                    "summary": {k: float(v) for k, v in d.summary().items()},
                    "labels": (labels.support_y.clone(), labels.query_y.clone(), labels.ways),
                },
            })
            return result, labels

        patch(Ablation, "step", recording_step)
        patch(Replicas, "reduce_step", recording_reduce)

    def inject(self, what: str) -> None:
        (self.record_dir / "fault_time").write_text(repr(time.time()))
        if what == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "STOP":
            os.kill(os.getpid(), signal.SIGSTOP)
        if what == "TERM":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise RuntimeError(f"injected fault on rank {self.rank}")

    def watch_writes(self) -> None:
        """Record every file opened for writing and every directory created (audit hook)."""
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def hook(event: str, args: tuple) -> None:
            if event == "open" and args[0] is not None:
                mode, flags = args[1], args[2]
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & write_flags):
                    self.writes.append(str(args[0]))
            elif event == "os.mkdir":
                self.writes.append(f"mkdir {args[0]}")

        sys.addaudithook(hook)

    def record(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "steps": self.steps, "writes": list(self.writes)}

    def dump(self) -> None:
        torch.save(self.record(), self.record_dir / f"rank{self.rank}.pt")


def main() -> None:
    probe = Probe(int(os.environ.get("RANK", "0")),
                  os.environ.get("BILEVEL_TEST_FAULT") if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
                  else None,
                  Path(os.environ["BILEVEL_TEST_RECORD"]))
    probe.install(setattr)
    atexit.register(probe.dump)
    probe.watch_writes()
    sys.argv = ["bilevel-train", *sys.argv[1:]]
    from bilevel.app.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
