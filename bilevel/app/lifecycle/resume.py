"""The resume contract: what a checkpoint must share with the run that continues it.

A checkpoint stores the *fingerprint* of its run: the flattened resolved config with the
resolved execution path and device type in place of ``execution``/``device``, and the code
version (``code.bilevel``, ``code.torch``). A run continues a checkpoint only when every
*trajectory* key matches — everything but :data:`FORCEABLE` and :data:`NOT_COMPARED`
(``train.resume`` itself, and ``dist.*``) — so that the continued run is the run that was
started, bit for bit (on the same number of processes; on another number, up to the summation
order of the cross-process reduction: ``docs/distributed.md``). :data:`FORCEABLE` keys
(``train.steps``, the logging, evaluation and checkpoint cadence) do not change the
parameters' trajectory and may differ with ``train.resume=force``; ``train.steps`` may never
fall below the checkpoint's step.
"""
from __future__ import annotations

import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from bilevel.app.lifecycle.checkpoint import LATEST, latest_checkpoint, load_checkpoint
from bilevel.errors import ResumeError
from bilevel.run_files import flatten

FORCEABLE = ("train.steps", "train.eval_every", "train.log_every", "train.image_every", "train.checkpoint_every", "eval.")
"""Keys that may change with ``train.resume=force`` (exact keys, or prefixes ending in '.').
``train.decompose_every`` is not among them: with an ablation, decomposition steps take the
encoder's update from the decomposition, so that cadence is part of the trajectory."""
NOT_COMPARED = ("train.resume", "dist.", "study.", "train.memory_gb")
"""Keys that are not part of the run: how it is resumed, how its processes talk, the memory budget,
and the study's declared comparisons (what the report tests, not what the run computes). The number
of processes is not in the fingerprint either: a run may resume on another world size
(``docs/distributed.md``). ``train.memory_gb`` only chose the memory strategy, which is recorded."""
RESOLVED = ("execution", "device", "memory")
"""Config keys replaced in the fingerprint by what they resolved to."""
OMITTED_AT_DEFAULT = {"cpu_conv": "onednn"}
"""Keys added after checkpoints existed: in the fingerprint only away from their default (the
behaviour before them), so that those checkpoints resume."""


def code_version() -> dict[str, str]:
    """The versions that determine the numerics: this package's and torch's."""
    try:
        bilevel_version = version("bilevel-contrastive")
    except PackageNotFoundError:
        bilevel_version = "unknown"
    return {"bilevel": bilevel_version, "torch": torch.__version__}


def fingerprint(cfg: DictConfig, execution: str, device: torch.device, memory: Optional[str] = None) -> dict[str, Any]:
    """The flattened record of everything that determines the run (see the module docstring);
    the memory strategy (``memory``, default the config's) only when it is not ``store``, so
    that checkpoints written before the key existed resume."""
    flat = {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
            if not _matches(k, NOT_COMPARED + RESOLVED) and not (k in OMITTED_AT_DEFAULT and OMITTED_AT_DEFAULT[k] == v)}
    flat.update({"execution": execution, "device": device.type})
    memory = memory or cfg.get("memory", "store")
    if memory != "store":
        flat["memory"] = memory
    flat.update({f"code.{k}": v for k, v in code_version().items()})
    return flat


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """``key`` is one of ``patterns`` (exact keys, or prefixes ending in '.')."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def is_forceable(key: str) -> bool:
    return _matches(key, FORCEABLE)


def check_resume(path: Path, step: int, saved: dict[str, Any], current: dict[str, Any], mode: str) -> None:
    """Raise :class:`ResumeError` unless the run of ``current`` may continue the checkpoint at
    ``path`` (``step``, fingerprint ``saved``) under ``train.resume=mode``."""
    steps = current["train.steps"]
    if step > steps:
        raise ResumeError(
            f"cannot resume {path}: it is at step {step}, past train.steps={steps}; set train.steps >= {step} "
            f"(with train.resume=force), or start a new run in another directory (hydra.run.dir=...)"
        )
    missing = object()
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k, missing) != current.get(k, missing))
    fixed = [k for k in differing if not is_forceable(k)]
    free = [k for k in differing if is_forceable(k)]
    refused = fixed + (free if mode != "force" else [])
    if not refused:
        return

    def show(key: str) -> str:
        return f"{key} (checkpoint: {saved.get(key, '<absent>')!r}, now: {current.get(key, '<absent>')!r})"

    parts = [f"cannot resume {path} (step {step}): the run differs from the checkpoint's run."]
    if fixed:
        parts.append(
            "These keys determine the trajectory and must match: " + "; ".join(show(k) for k in fixed) + "."
        )
    if free and mode != "force":
        parts.append("These keys may change with train.resume=force: " + "; ".join(show(k) for k in free) + ".")
    parts.append(
        f"Rerun with the checkpoint's values (its config is {path.parent / 'config.yaml'}), "
        "or start a new run in another directory (hydra.run.dir=...)."
    )
    raise ResumeError(" ".join(parts))


def checkpoint_to_resume(run_dir: Path, mode: str) -> Optional[tuple[Path, dict[str, Any]]]:
    """The checkpoint ``train.resume=mode`` continues in ``run_dir`` (path and verified state,
    on the CPU: generator states must stay there; parameters and optimiser state are copied to
    the run's device when restored), or None for a new run. ``true``/``force`` require one;
    ``false`` refuses a directory that holds one (a new run there would overwrite its record)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        if mode in ("true", "force"):
            raise ResumeError(
                f"train.resume={mode} but {run_dir} holds no checkpoint to continue; "
                "use train.resume=auto to start a new run there"
            )
        return None
    if mode == "false":
        raise ResumeError(
            f"train.resume=false but {run_dir} already holds a run ({path.name}); continue it with "
            "train.resume=auto, or start the new run in another directory (hydra.run.dir=...)"
        )
    if path.name != LATEST:
        print(f"{run_dir / LATEST} is missing (a crash between two renames); resuming from {path}")
    return path, load_checkpoint(path, "cpu")


def resume_command(overrides: Sequence[str], run_dir: str | Path, program: str = "bilevel-train") -> str:
    """The command that continues the run in ``run_dir``: the original overrides without any
    ``train.resume``/``hydra.run.dir``, then ``train.resume=auto hydra.run.dir=<run_dir>``."""
    dropped = ("train.resume=", "hydra.run.dir=")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(dropped)]
    words = [program, *kept, "train.resume=auto", f"hydra.run.dir={Path(run_dir).resolve()}"]
    return " ".join(shlex.quote(w) for w in words)
