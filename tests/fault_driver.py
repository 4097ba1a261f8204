"""``bilevel-train`` with one fault injected at a known step (used by ``test_faults.py``).

    python tests/fault_driver.py ALGORITHM STEP SIGNAL [overrides...]

Right after the STEP-th outer step of this process (inside the algorithm's
``outer_step_done``, before that step's checkpoint), the process sends itself SIGNAL
(``KILL``, ``INT`` or ``TERM``); ``KILL`` leaves the run directory exactly as a crash would.
``INT2`` sends SIGINT twice, 50 ms apart (a double Ctrl-C). STEP 0 sends SIGNAL during start-up
instead, as the run's set-up begins (before any step or file of the run).
Run with ``BILEVEL_ALLOCATOR=default``: a re-exec under another allocator would drop the hook.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def main() -> None:
    algorithm, step, name, *overrides = sys.argv[1:]
    from bilevel.algorithm import get_algorithm

    cls = get_algorithm(algorithm)
    step_done = cls.outer_step_done
    count = 0

    def send() -> None:
        os.kill(os.getpid(), getattr(signal, f"SIG{name.rstrip('2')}"))
        if name.endswith("2"):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()

    def outer_step_done(self) -> None:
        nonlocal count
        step_done(self)
        count += 1
        if count == int(step):
            send()

    cls.outer_step_done = outer_step_done
    if int(step) == 0:
        import bilevel.app.train as app

        setup = app.setup

        def interrupted_setup(cfg):
            send()
            return setup(cfg)

        app.setup = interrupted_setup
    sys.argv = ["bilevel-train", *overrides]
    from bilevel.app.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
