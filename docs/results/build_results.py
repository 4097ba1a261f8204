"""Build docs/RESULTS.md from RESULTS.template.md and the tables bilevel-report wrote.

A line ``{{FILE#HEADING}}`` in the template is replaced by the section of ``FILE`` (relative to
this folder; written by ``bilevel-report ... --markdown FILE``) whose ``### `` heading starts with
``HEADING``, up to the next ``### `` heading; ``{{FILE}}`` includes the whole file. So every table
in RESULTS.md is bilevel-report's output, unedited:

    python docs/results/build_results.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIRECTIVE = re.compile(r"^\{\{([^#}]+)(?:#([^}]+))?\}\}$")


def section(text: str, heading: str) -> str:
    """The ``### heading…`` section of ``text`` (without its heading line)."""
    parts = re.split(r"^### ", text, flags=re.M)
    for part in parts[1:]:
        if part.startswith(heading):
            return part.split("\n", 1)[1].strip("\n") + "\n"
    raise KeyError(f"no section starting with {heading!r}")


def build(template: str) -> str:
    out = []
    for line in template.splitlines():
        match = DIRECTIVE.match(line.strip())
        if match is None:
            out.append(line)
            continue
        path, heading = HERE / match.group(1).strip(), match.group(2)
        if not path.is_file():
            out.append(f"*(not run: {match.group(1).strip()} does not exist)*")
            continue
        text = path.read_text()
        out.append((section(text, heading.strip()) if heading else text).rstrip("\n"))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = HERE.parent / "RESULTS.md"
    target.write_text(build((HERE / "RESULTS.template.md").read_text()))
    print(f"wrote {target}", file=sys.stderr)
