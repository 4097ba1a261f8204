"""``python -m bilevel.report RUN_DIR...``: the same command as ``bilevel-report``."""
from bilevel.report.cli import main

if __name__ == "__main__":
    main()
