"""What code a run ran: recorded in every run's ``config.yaml``
(:meth:`~bilevel.app.lifecycle.run_dir.RunDirectory.begin`).

* ``commit`` — ``git rev-parse HEAD`` of the checkout that holds this package (``unknown``
  outside a git checkout), ``dirty`` — whether its tracked files differed from that commit
  (``git status --porcelain --untracked-files=no`` non-empty; None when unknown).
* ``engine_sha256`` — SHA-256 over the engine's source: every ``*.py`` file of the ``bilevel``
  package and of the built-in ``algorithms`` package, in sorted relative-path order, each as
  ``path NUL content NUL``. Equal hashes: the same engine code, whatever the commit.
* ``engine_epoch`` — :data:`ENGINE_EPOCH`, the number of the float64 meta-gradient reference
  (``tests/data/reference_meta_grads.pt``) this engine reproduces bit for bit. It is bumped
  whenever that reference is regenerated (an engine change that alters float64
  meta-gradients); a result whose runs record an older epoch (or none) predates such a change.
"""
from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import bilevel

ENGINE_EPOCH = 1
"""Bump together with a regenerated ``tests/data/reference_meta_grads.pt`` (the saved-reference
test pins the file's hash per epoch)."""

PACKAGE_ROOT = Path(bilevel.__file__).resolve().parent
ENGINE_PACKAGES = (PACKAGE_ROOT, PACKAGE_ROOT.parent / "algorithms")


def engine_sha256(packages: tuple[Path, ...] = ENGINE_PACKAGES) -> str:
    """SHA-256 of the engine's ``*.py`` sources (module docstring); a missing package is skipped."""
    digest = hashlib.sha256()
    for package in packages:
        if not package.is_dir():
            continue
        for path in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{path.relative_to(package).as_posix()}".encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_ROOT.parent), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[str, Optional[bool]]:
    """``(commit, dirty)`` of the checkout holding this package; ``("unknown", None)`` outside git."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown", None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


@lru_cache(maxsize=1)
def engine_record() -> dict[str, Any]:
    """The engine's hash and epoch (computed once per process: the source does not change under it)."""
    return {"engine_sha256": engine_sha256(), "engine_epoch": ENGINE_EPOCH}


def provenance() -> dict[str, Any]:
    """The record (module docstring): ``{commit, dirty, engine_sha256, engine_epoch}``."""
    commit, dirty = git_state()
    return {"commit": commit, "dirty": dirty, **engine_record()}
