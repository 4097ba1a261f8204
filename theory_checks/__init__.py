"""The paper's claims (docs/theory.md §7) as executable checks: ``python -m theory_checks``.

Each module of this package registers check functions with :func:`core.check`; the runner
(:mod:`theory_checks.__main__`) imports every module, runs every check and prints the
measured value of every claim against its threshold.
"""
from .core import CHECKS, ClaimResult, check, max_abs

__all__ = ["CHECKS", "ClaimResult", "check", "max_abs"]
