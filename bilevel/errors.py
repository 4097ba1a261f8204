"""The failures a user can act on, each with the exit status ``bilevel-train`` ends with.

Every message says what happened, names the key, file or tensor concerned and what to do;
``bilevel-train`` prints it without a traceback (``HYDRA_FULL_ERROR=1`` shows one) and exits
with ``exit_code``. Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class BilevelError(Exception):
    """Base of the actionable failures; ``exit_code`` is the process status for the CLI."""

    exit_code: int = 1


class ConfigError(BilevelError, ValueError):
    """A configuration that cannot run: the message names the key and its valid values.
    Raised before any work (nothing is written to the run directory)."""

    exit_code = 2


class UnknownAlgorithm(ConfigError):
    """No plugin is registered under ``name`` (given as the config key ``key``). The registry
    raises it naming the registered plugins; the app restates it with the presets as well."""

    def __init__(self, message: str, name: str, key: str) -> None:
        super().__init__(message)
        self.name = name
        self.key = key


class ResumeError(ConfigError):
    """The run directory's checkpoint and the requested run do not go together (different
    trajectory keys, no checkpoint where one is required, one where none is wanted)."""


class CorruptFileError(BilevelError):
    """A file we wrote does not read back (truncated, overwritten, wrong format version);
    the message names the file and the fix."""


class RunDirectoryBusy(BilevelError):
    """Another live process holds the run directory's lock; the message names it."""


class NonFiniteError(BilevelError, FloatingPointError):
    """A NaN/inf appeared in the loss, a gradient, a parameter or the optimiser state; the
    message names the first such tensor, the step range and the last good checkpoint."""


class RunInterrupted(BilevelError):
    """SIGINT/SIGTERM stopped the run after a finished step and a written checkpoint.
    ``exit_code`` is ``128 + signal`` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class DistributedError(BilevelError):
    """The processes of a distributed run lost each other (one died, raised or did not answer
    within ``dist.timeout_s``) or diverged; on the other ranks, also rank 0's refusal to start
    the run, with its message and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
