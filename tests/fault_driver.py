"""``bilevel-train`` with one fault injected at a known step (used by ``test_faults.py``).

    python tests/fault_driver.py ALGORITHM STEP SIGNAL [overrides...]

Right after the STEP-th outer step of this process (inside the algorithm's
``outer_step_done``, before that step's checkpoint), the process sends itself SIGNAL
(``KILL``, ``INT`` or ``TERM``); ``KILL`` leaves the run directory exactly as a crash would.
Run with ``BILEVEL_ALLOCATOR=default``: a re-exec under another allocator would drop the hook.
"""
from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    algorithm, step, name, *overrides = sys.argv[1:]
    from bilevel.algorithm import get_algorithm

    cls = get_algorithm(algorithm)
    step_done = cls.outer_step_done
    count = 0

    def outer_step_done(self) -> None:
        nonlocal count
        step_done(self)
        count += 1
        if count == int(step):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

    cls.outer_step_done = outer_step_done
    sys.argv = ["bilevel-train", *overrides]
    from bilevel.app.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
