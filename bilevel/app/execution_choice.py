"""Settling a run's execution path once, deterministically, and saying why.

The path is, in order: the one set in the config (``execution=loop``); the one recorded in
the checkpoint being resumed (a run never changes path); the only one the algorithm offers;
the fastest in the measurement cached for this machine and configuration; else the fastest
when measured now. A measurement (:func:`measure_paths`) runs on a batch of its own sampler
and restores the algorithm's state and the global random state afterwards, so it consumes
none of the run's draws; it is cached in ``execution.json`` under the cache directory
(:func:`bilevel.files.cache_dir`), keyed by the machine (host, processor or GPU, torch
threads) and the configuration (the run's fingerprint without seeds, cadence and path),
written atomically under a lock. The path is recorded in the checkpoint, ``config.yaml`` and
TensorBoard by the trainer.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from bilevel.algorithm import BilevelAlgorithm
from bilevel.data import TaskBatch
from bilevel.execution.mapping import choose_execution
from bilevel.files import FileLock, atomic_write_text, cache_dir
from bilevel.primitives.params import Params
from bilevel.app.resume import is_forceable
from bilevel.rng import global_rng_state, set_global_rng_state

CACHE_FILE = "execution.json"


@dataclass(frozen=True)
class ExecutionChoice:
    """The path a run takes and, in one plain sentence, why."""

    path: str
    reason: str


def measure_paths(algorithm: BilevelAlgorithm, params: Params, batch: TaskBatch, device: torch.device) -> dict[str, float]:
    """Seconds per meta-step of each of ``algorithm.executions`` on ``batch``; the algorithm's
    state (e.g. a noise generator) and the global random state are restored."""
    state, rng = copy.deepcopy(algorithm.state_dict()), global_rng_state()

    def attempt(mode: str) -> None:
        algorithm.with_execution(mode).meta_grad(params, batch)

    try:
        return choose_execution(attempt, algorithm.executions, device)[1]
    finally:
        algorithm.load_state_dict(state)
        set_global_rng_state(rng)


def machine(device: torch.device) -> dict[str, Any]:
    """What makes timings of one machine comparable: host, processor or GPU, torch threads."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            processor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), processor)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"host": platform.node(), "processor": processor, "gpu": gpu, "threads": torch.get_num_threads()}


def cache_key(device: torch.device, fingerprint: dict[str, Any]) -> str:
    """The cache key of a measurement: machine and fingerprint minus seeds, cadence and path."""
    config = {k: v for k, v in fingerprint.items()
              if k != "execution" and not k.endswith("seed") and not is_forceable(k)}
    text = json.dumps({"machine": machine(device), "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as err:
        logging.getLogger(__name__).warning("ignoring unreadable execution cache %s (%s); measuring again", path, err)
        return {}


PATHS_IN_WORDS = {
    "loop": "one task after the other",
    "vmap": "all tasks of a meta-batch at once (vmap)",
    "shared": "all tasks through one shared encoder pass",
}


def _timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{m} {t * 1e3:.1f} ms" for m, t in sorted(timings.items(), key=lambda kv: kv[1]))


def settle_execution(requested: str, available: Sequence[str], recorded: Optional[str], key: str,
                     measure: Callable[[], dict[str, float]]) -> ExecutionChoice:
    """The run's path and why, in plain words (see the module docstring); ``measure`` runs only
    on a cache miss."""

    def chose(path: str, why: str) -> ExecutionChoice:
        return ExecutionChoice(path, f"tasks run {PATHS_IN_WORDS.get(path, path)} (execution={path}): {why}")

    if requested != "auto":
        return chose(requested, "as set in the config")
    if recorded is not None:
        return chose(recorded, "as in the checkpoint being resumed (a run never changes how it runs its tasks)")
    if len(available) == 1:
        return chose(available[0], "the only way this algorithm offers with this configuration")
    path = cache_dir() / CACHE_FILE
    entry = _read_cache(path).get(key)
    if entry is not None and entry["path"] in available:
        return chose(entry["path"], f"the faster way on this machine for this configuration, as measured once "
                                    f"before ({_timings(entry['seconds'])} per step; to measure again, delete {path})")
    timings = measure()
    fastest = min(timings, key=timings.__getitem__)
    with FileLock(path.with_name(path.name + ".lock")):
        cache = _read_cache(path)
        cache[key] = {"path": fastest, "seconds": timings}
        atomic_write_text(json.dumps(cache, indent=1, sort_keys=True), path)
    return chose(fastest, f"the faster way on this machine for this configuration, measured now on a batch of "
                          f"its own ({_timings(timings)} per step) and kept for later runs in {path}")
