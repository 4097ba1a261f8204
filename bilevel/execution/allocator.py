"""The CPU memory allocator configuration a process runs under.

With glibc's default malloc, large activation buffers are served by ``mmap``, unmapped when
freed and faulted back in on the next step: a large share of a CPU meta-step's time goes to
page faults (docs/performance.md, "Allocator": the measured faults and times).
``retain`` never serves allocations with ``mmap`` and never trims the heap, so the pages
stay mapped between steps. glibc reads its tunables once at start-up, so switching means
re-executing the process with the new environment.
"""
from __future__ import annotations

import os
import sys

RETAIN_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
ALLOCATORS = ("retain", "default")


def ensure_allocator(mode: str, argv: list[str] | None = None) -> None:
    """Re-execute this process (same interpreter, ``argv``) under the ``mode`` allocator.

    ``retain``: ``GLIBC_TUNABLES=RETAIN_TUNABLES``; ``default``: no ``GLIBC_TUNABLES``. A no-op
    when the environment already matches, or off Linux.
    """
    if mode not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {mode!r}")
    if not sys.platform.startswith("linux"):
        return
    want = RETAIN_TUNABLES if mode == "retain" else None
    if os.environ.get("GLIBC_TUNABLES") == want:
        return
    env = dict(os.environ)
    if want is None:
        env.pop("GLIBC_TUNABLES", None)
    else:
        env["GLIBC_TUNABLES"] = want
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + (sys.argv if argv is None else argv), env)
