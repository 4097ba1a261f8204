"""Settling a run's execution path once, deterministically, and saying why.

The path — with the memory strategy (``memory``: :mod:`bilevel.hypergrad.recompute`), among
the combinations that fit the memory budget (:func:`bilevel.execution.memory.memory_plans`) — is,
in order: the one set in the config (``execution=loop``, ``memory=store``); the one recorded in
the checkpoint being resumed (a run never changes path or strategy); the only one the algorithm
offers or the budget admits; the fastest in the measurement cached for this machine and
configuration; else the fastest when measured now. A measurement (:func:`measure_paths`) runs on a batch of its own sampler
and restores the algorithm's state and the global random state afterwards, so it consumes
none of the run's draws; it is cached in ``execution.json`` under the cache directory
(:func:`bilevel.files.cache_dir`), keyed by the machine (host, processor or GPU, torch
threads) and the configuration (the run's fingerprint without seeds, cadence and path),
written atomically under a lock, with the load average and CPU count it was measured under. The
path is recorded in the checkpoint, ``config.yaml`` and TensorBoard by the trainer.

A cached measurement can be stale (taken while the machine was busy, or idle): a run whose path
came from the cache times a few of its own plain meta-steps (:class:`PathCheck`) and, when their
median disagrees with the cached time of that path by more than :data:`DISAGREEMENT` times either
way, drops the entry and says so — the run keeps its path (a run never changes path), the next
start measures again. A cache file that is not a JSON object, or an entry that is malformed, is
ignored with a warning and measured again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from bilevel.algorithm import BilevelAlgorithm
from bilevel.data import TaskBatch
from bilevel.execution.mapping import synchronize, choose_execution
from bilevel.files import FileLock, atomic_write_text, cache_dir
from bilevel.primitives.params import Params
from bilevel.app.lifecycle.resume import is_forceable
from bilevel.rng import global_rng_state, set_global_rng_state

CACHE_FILE = "execution.json"
DISAGREEMENT = 2.0
"""How far (a factor, either way) an observed meta-step may be from the cached time of its path."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionChoice:
    """The path and memory strategy a run takes and, in plain words, why; when it came from the
    cache, the cached seconds per meta-step of that way and the cache key (for :class:`PathCheck`)."""

    path: str
    reason: str
    memory: str = "store"
    cached_s: Optional[float] = None
    key: Optional[str] = None


Way = tuple[str, str]
"""A way to run the meta-step: ``(execution path, memory strategy)``."""


def way_label(way: Way, ways: Sequence[Way]) -> str:
    """``loop`` when every candidate holds memory the same way, else ``loop/recompute``."""
    return way[0] if len({m for _, m in ways}) == 1 else f"{way[0]}/{way[1]}"


def measure_paths(algorithm: BilevelAlgorithm, params: Params, batch: TaskBatch, device: torch.device,
                  ways: Sequence[Way]) -> dict[str, float]:
    """Seconds per meta-step of each of ``ways`` on ``batch``, keyed by :func:`way_label`; the
    algorithm's state (e.g. a noise generator) and the global random state are restored."""
    state, rng = copy.deepcopy(algorithm.state_dict()), global_rng_state()
    by_label = {way_label(w, ways): w for w in ways}

    def attempt(label: str) -> None:
        path, memory = by_label[label]
        algorithm.with_execution(path).with_memory(memory).meta_grad(params, batch)

    try:
        return choose_execution(attempt, list(by_label), device)[1]
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
    """The cache's entries; an unreadable file, or one that is not a JSON object, counts as empty."""
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as err:
        log.warning("ignoring unreadable execution cache %s (%s); measuring again", path, err)
        return {}
    if not isinstance(cache, dict):
        log.warning("ignoring execution cache %s: it holds a JSON %s, not an object; measuring again", path,
                    type(cache).__name__)
        return {}
    return cache


def _cached_way(entry: Any, ways: Sequence[Way]) -> Optional[tuple[Way, float]]:
    """The way a cache entry names, when it is one of ``ways`` and holds its time in seconds."""
    if not isinstance(entry, dict) or not isinstance(entry.get("seconds"), dict):
        return None
    way = (entry.get("path"), entry.get("memory", "store"))
    seconds = entry["seconds"].get(way_label(way, ways)) if way in ways else None
    return (way, float(seconds)) if isinstance(seconds, (int, float)) else None


def _load() -> str:
    """The 1-minute load average over the CPUs, as a cache entry records it."""
    try:
        return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load unknown"


def forget(key: str) -> None:
    """Drop the cached measurement ``key`` (the next start measures again)."""
    path = cache_dir() / CACHE_FILE
    with FileLock(path.with_name(path.name + ".lock")):
        cache = _read_cache(path)
        if cache.pop(key, None) is not None:
            atomic_write_text(json.dumps(cache, indent=1, sort_keys=True), path)


PATHS_IN_WORDS = {
    "loop": "one task after the other",
    "vmap": "all tasks of a meta-batch at once (vmap)",
    "shared": "all tasks through one shared encoder pass",
}


def _timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{m} {t * 1e3:.1f} ms" for m, t in sorted(timings.items(), key=lambda kv: kv[1]))


def memory_words(memory: str) -> str:
    """What ``memory`` holds for the backward, in words."""
    if memory == "store":
        return "the backward holds every inner step's activations (memory=store)"
    return f"the backward re-runs the inner steps a segment at a time instead of holding them (memory={memory})"


def settle_execution(requested: Way, ways: Sequence[Way], recorded: Optional[Way], key: str,
                     measure: Callable[[], dict[str, float]], budget: str = "") -> ExecutionChoice:
    """The run's path and memory strategy and why, in plain words (see the module docstring):
    ``requested`` is the config's ``(execution, memory)``, ``ways`` the combinations allowed that
    fit the memory budget (``budget``: how it was set and what fitted, in words); ``measure``
    times ``ways`` (keyed by :func:`way_label`) and runs only on a cache miss."""

    def chose(way: Way, why: str, cached_s: Optional[float] = None) -> ExecutionChoice:
        path, memory = way
        return ExecutionChoice(path, f"tasks run {PATHS_IN_WORDS.get(path, path)} (execution={path}): {why}; "
                                     f"{memory_words(memory)}{budget}", memory, cached_s,
                               None if cached_s is None else key)

    if "auto" not in requested:
        return chose(requested, "as set in the config")
    if recorded is not None:
        return chose(recorded, "as in the checkpoint being resumed (a run never changes how it runs its tasks)")
    if len(ways) == 1:
        return chose(ways[0], "the only way this algorithm offers with this configuration and memory budget")
    path = cache_dir() / CACHE_FILE
    entry = _read_cache(path).get(key)
    cached = _cached_way(entry, ways)
    if cached is not None:
        under = f" under {entry['load']}" if isinstance(entry.get("load"), str) else ""
        return chose(cached[0], f"the faster way on this machine for this configuration, as measured once "
                                f"before{under} ({_timings(entry['seconds'])} per step; measured again when a "
                                f"run's steps disagree with it by more than {DISAGREEMENT:g}x, or when {path} "
                                f"is deleted)", cached[1])
    timings = measure()
    labels = {way_label(w, ways): w for w in ways}
    fastest = labels[min(timings, key=timings.__getitem__)]
    load = _load()
    with FileLock(path.with_name(path.name + ".lock")):
        cache = _read_cache(path)
        cache[key] = {"path": fastest[0], "memory": fastest[1], "seconds": timings, "load": load}
        atomic_write_text(json.dumps(cache, indent=1, sort_keys=True), path)
    return chose(fastest, f"the faster way on this machine for this configuration, measured now under {load} on a "
                          f"batch of its own ({_timings(timings)} per step) and kept for later runs in {path}")


@dataclass
class PathCheck:
    """Times the first ``samples`` plain meta-steps of an attempt whose path came from the cache
    (after one warm-up step; decomposition steps do other work and are not timed) and compares
    their median with the cached time (module docstring). ``writer``: this process may change
    the cache (rank 0)."""

    choice: ExecutionChoice
    device: torch.device
    writer: bool = True
    samples: int = 3
    seen: int = 0
    times: list[float] = field(default_factory=list)
    verdict: Optional[str] = None

    def timed(self, meta_step: Callable[[], Any], plain: bool) -> Any:
        """Run ``meta_step()``, timing it when it is a plain step the check still needs."""
        self.seen += 1
        if self.choice.cached_s is None or not plain or self.seen == 1 or len(self.times) >= self.samples:
            return meta_step()
        synchronize(self.device)
        start = time.perf_counter()
        out = meta_step()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        if len(self.times) == self.samples:
            self.verdict = self._judge(statistics.median(self.times))
        return out

    def _judge(self, observed: float) -> Optional[str]:
        cached, key = self.choice.cached_s, self.choice.key
        ratio = observed / max(cached, 1e-12)
        if 1 / DISAGREEMENT <= ratio <= DISAGREEMENT or key is None:
            return None
        if self.writer:
            forget(key)
        return (f"a meta-step on this path now takes {observed * 1e3:.1f} ms, {ratio:.2g}x the {cached * 1e3:.1f} ms "
                f"measured before (the machine's load has changed since): the measurement is dropped and the next "
                f"run measures again; this run keeps execution={self.choice.path} ({_load()} now)")
