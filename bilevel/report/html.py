"""``report.html``: ``bilevel-report``'s tables and figures as one self-contained page.

The page holds the report's Markdown (headings ``###``, tables, notes) as HTML and every figure
as a base64-embedded PNG with a caption saying what it draws, so it can be mailed, archived or
opened from any folder: it reads no other file.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

REPORT_HTML = "report.html"
CAPTIONS = {
    "learning_curves.png": "Validation accuracy (after the headline number of test-time inner steps) against the "
                           "outer step: at step 0, every train.eval_every steps and at the last step. Several seeds: "
                           "mean and t-based 95 % CI band over seeds; one seed: the run's 95 % CI over its "
                           "validation tasks.",
    "decomposition_shares.png": "Share ⟨term, total⟩ / ‖total‖² of each term in the encoder meta-gradient, "
                                "per setting (the shares sum to 1); band: ± sd over seeds.",
    "feature_cosines.png": "Mean cosine similarity of query and support features of the same class and of "
                           "different classes, per setting; band: ± sd over seeds.",
    "cosine_heatmaps.png": "The cosine probe: class × class feature cosine maps of the meta-parameters on a fixed "
                           "task, query vs support | query vs query, averaged over seeds.",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
td { white-space: nowrap; } th { vertical-align: bottom; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
.warning { background: #fff4e0; border-left: 4px solid #f0a020; padding: 0.5em 1em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: Sequence[str]) -> str:
    """A Markdown table (header, separator, rows) as an HTML table."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _cells(lines[0]))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(line)) + "</tr>"
                   for line in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def markdown_html(text: str) -> str:
    """The report's Markdown subset as HTML: ``### heading``, tables (``|`` lines), paragraphs."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
            continue
        if line.startswith("#"):
            out.append(f"<h2>{html.escape(line.lstrip('#').strip())}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def figure_html(path: Path) -> str:
    """``path`` (a PNG) embedded as base64, with its caption (:data:`CAPTIONS`)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = CAPTIONS.get(path.name, path.stem.replace("_", " "))
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption><b>{html.escape(path.name)}</b>: {html.escape(caption)}</figcaption></figure>")


def report_page(sources: Sequence[Path], markdown: str, figures: Sequence[Path], warnings: Sequence[str]) -> str:
    """The whole page: what it reports on, the warnings, the tables, the figures."""
    names = ", ".join(str(p) for p in sources)
    body = [f"<h1>bilevel-report: {html.escape(names)}</h1>",
            *(f'<p class="warning">{html.escape(w)}</p>' for w in warnings),
            markdown_html(markdown), "<h2>Figures</h2>", *map(figure_html, figures)]
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>bilevel-report: '
            f"{html.escape(names)}</title><style>{STYLE}</style></head><body>\n")
    return head + "\n".join(body) + "\n</body></html>\n"


def write_report_html(out: Path, sources: Sequence[Path], markdown: str, figures: Sequence[Path],
                      warnings: Sequence[str]) -> Path:
    """Write :func:`report_page` to ``out/report.html``; returns its path."""
    path = out / REPORT_HTML
    path.write_text(report_page(sources, markdown, figures, warnings), encoding="utf-8")
    return path
