"""Checkpoints of a run directory: the last two, atomic, checksummed, with a format version.

``checkpoint.pt`` is the latest and ``checkpoint.prev.pt`` the one before: a new checkpoint
is written to a temporary file, the latest is renamed to the previous, then the new one is
renamed into place (:func:`bilevel.files.atomic_write_bytes`). A crash at any point leaves at
least one complete checkpoint; between the two renames only the previous one, which
:func:`latest_checkpoint` then returns. A checkpoint that does not read back is a
:class:`~bilevel.errors.CorruptFileError` that names it and says whether the other one is intact.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from bilevel.errors import CorruptFileError
from bilevel.files import load_checked, save_checked

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
KIND = "checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``state`` as the run directory's latest checkpoint, keeping the one before."""
    run_dir = Path(run_dir)
    path = run_dir / LATEST
    save_checked(state, path, KIND, FORMAT_VERSION, keep_previous=run_dir / PREVIOUS)
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """``checkpoint.pt``, else ``checkpoint.prev.pt`` (a crash between the renames), else None."""
    for name in (LATEST, PREVIOUS):
        path = Path(run_dir) / name
        if path.exists():
            return path
    return None


def _read(path: Path, device: torch.device | str) -> dict[str, Any]:
    return load_checked(path, KIND, FORMAT_VERSION, map_location=device)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint. A corrupt latest checkpoint names the previous one and
    whether it reads back (with its step), so the fix is one ``mv``."""
    path = Path(path)
    try:
        return _read(path, device)
    except CorruptFileError as err:
        previous = path.with_name(PREVIOUS)
        if path.name != LATEST or not previous.exists():
            raise CorruptFileError(f"{err}. No other checkpoint to fall back on: start a new run in another directory.") from None
        try:
            step = _read(previous, "cpu")["step"]
        except CorruptFileError as prev_err:
            raise CorruptFileError(f"{err}. The previous checkpoint is unreadable too ({prev_err}).") from None
        raise CorruptFileError(
            f"{err}. The previous checkpoint {previous} (step {step}) is intact: to resume from it, "
            f"run `mv {previous} {path}` and start again with train.resume=auto."
        ) from None
