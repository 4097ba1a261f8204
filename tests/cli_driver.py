"""Run many ``bilevel-train`` command lines fast: import once, fork a child per command line.

    python tests/cli_driver.py < cases.json > results.json

``cases.json``: a list of ``{"args": [...], "cwd": "...", "env": {...}}`` (``env`` optional: variables
the child sets, e.g. ``BILEVEL_CACHE``). Each child changes to ``cwd``, sends
its stdout and stderr to files there, runs :func:`bilevel.app.train.main` with ``args`` as the
command line and exits with its status (an uncaught exception prints its traceback, status 1),
exactly as ``python -m bilevel.app.train ARGS`` would after its imports. Output: a list of
``{"status", "stdout", "stderr"}`` in the order of the cases. Run with
``BILEVEL_ALLOCATOR=default`` (no re-exec).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def run_child(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    os.chdir(cwd)
    os.environ.update(env)
    for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["bilevel-train", *args]
    status = 0
    try:
        from bilevel.app.train import main

        main()
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001  (what the interpreter would print)
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    import bilevel.app.train  # noqa: F401  (the imports every child shares)

    results = []
    for case in json.load(sys.stdin):
        cwd = Path(case["cwd"])
        pid = os.fork()
        if pid == 0:
            run_child(case["args"], cwd, case.get("env", {}))
        _, status = os.waitpid(pid, 0)
        results.append({
            "status": os.waitstatus_to_exitcode(status),
            "stdout": (cwd / "stdout.txt").read_text(),
            "stderr": (cwd / "stderr.txt").read_text(),
        })
        (cwd / "stdout.txt").unlink()
        (cwd / "stderr.txt").unlink()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
