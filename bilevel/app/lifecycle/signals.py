"""A graceful stop on SIGINT/SIGTERM for the training loop.

While :class:`GracefulStop` is active (in the main thread), the first SIGINT or SIGTERM is
only recorded: the loop finishes its current step, writes a checkpoint and stops with
:class:`~bilevel.errors.RunInterrupted` (exit status 130/143). A repeat within
:data:`REPEAT_S` of the first is the same press (a double Ctrl-C) and is ignored; a later one acts
as usual (SIGINT raises ``KeyboardInterrupt``, SIGTERM ends the process), so a stuck run can
still be stopped.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0
"""A signal this soon after the first is taken as the same request."""


class GracefulStop:
    """Context manager; ``signum`` is the first signal received while active, else None."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            print(f"\n{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                  f"(send it again after {REPEAT_S:g} s to stop at once)", file=sys.stderr, flush=True)
        elif time.monotonic() - self._first >= REPEAT_S:
            self._restore()
            signal.raise_signal(signum)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
