"""Console streams that outlive their reader.

``bilevel-train ... 2>&1 | tee log`` and Ctrl-C: the terminal sends SIGINT to the whole
pipeline, ``tee`` dies at once, and the run — which finishes its step and writes a checkpoint
first (:mod:`bilevel.app.lifecycle.signals`) — then writes to a pipe nobody reads. Python ignores SIGPIPE,
so such a write raises :class:`BrokenPipeError`; uncaught, it would end the run before its
checkpoint. :func:`survive_closed_console` wraps ``sys.stdout`` and ``sys.stderr`` so that the
first broken write points the stream's file descriptor at ``/dev/null`` (so buffered output and
the interpreter's final flush succeed too) and drops that write: the run goes on, and everything
still reaches ``train.log`` (:mod:`bilevel.app.lifecycle.console`), the resume command included.
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class SurvivingStream:
    """A text stream that turns a closed reader into a sink (see the module docstring); every
    other attribute is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def _to_null(self) -> None:
        self.reader_gone = True
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_null()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_null()
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_closed_console() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`SurvivingStream` (idempotent; streams
    without a file descriptor, such as a test's capture, are left as they are)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, SurvivingStream):
            continue
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        setattr(sys, name, SurvivingStream(stream))
