"""A graceful stop on SIGINT/SIGTERM for the training loop.

While :class:`GracefulStop` is active (in the main thread), the first SIGINT or SIGTERM is
only recorded: the loop finishes its current step, writes a checkpoint and stops with
:class:`~bilevel.errors.RunInterrupted` (exit status 130/143). The first signal also restores
the previous handlers, so a second one acts as usual (SIGINT raises ``KeyboardInterrupt``,
SIGTERM ends the process) and a stuck run can still be stopped.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager; ``signum`` is the first signal received while active, else None."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum
        self._restore()
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

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
