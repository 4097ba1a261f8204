"""TensorBoard logging of a run: scalars with descriptions, the custom-scalars layout,
decomposition panels, figures, text and HPARAMS (what each tag is: :mod:`bilevel.app.tb.layout`).

Events go to ``run_dir/tb/<name>/``, so TensorBoard names the run after the experiment
(:func:`run_name`); the lines of a chart that must be told apart go to runs nested in it,
``tb/<name>/term=contrastive/`` (:func:`bilevel.tags.placement`), so that each has its own colour
and the run selector names it. Each attempt of a run writes one event file. A resumed attempt first copies
into it the earlier attempts' events that the checkpoint it resumes had seen — logged at or
before its step and before it was written — and removes the earlier files, so every curve is
monotone with one point per step; a new run removes the files of attempts that never
checkpointed.

A term that is exactly zero by construction under the run's configuration
(:func:`bilevel.decomposition.structural.structural_zeros`) is logged once, at the first step
(:data:`FIRST_STEP`), with the reason in its description and in the text panel
:data:`bilevel.tags.STRUCTURALLY_ZERO`, instead of as a flat line.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from torch.utils.tensorboard import SummaryWriter

from bilevel import tags
from bilevel.files import KeptDirectory
from bilevel.data.batch import TaskBatch
from bilevel.decomposition.record import Decomposition
from bilevel.app.distributed.replicas import GatheredLabels
from bilevel.app.tb.figures import cosine_figure, pair_weight_figure
from bilevel.app.tb.hparams import hparam_summaries
from bilevel.app.tb.layout import custom_scalars_layout, describe, present, term_of
from bilevel.run_files import EVENTS_DIR, event_files

NAME_CHARS = 80
FIRST_STEP = 1
"""Where the first outer step's values are logged (the decomposition of step ``n`` is logged at ``n``,
like its loss; an evaluation after ``n`` steps at ``n``): a structurally zero term's one point."""


def run_name(name: str) -> str:
    """``name`` as one directory name (TensorBoard's run name): ``/`` and spaces become ``_``;
    beyond :data:`NAME_CHARS` characters, its start and a hash of the whole."""
    safe = re.sub(r"[/\\\s]+", "_", name).strip("._") or "run"
    if len(safe) <= NAME_CHARS:
        return safe
    return f"{safe[:NAME_CHARS - 12]}...{hashlib.sha1(safe.encode()).hexdigest()[:8]}"


class RunLogger:
    """A SummaryWriter in ``run_dir/tb/<name>`` (and one per nested run, opened at its first
    point) with helpers for the framework's panels.

    ``resume=(step, time)``: carry the earlier events logged at or before ``step`` and before
    wall time ``time`` (when the resumed checkpoint was written); None: a new run, which also
    writes the custom-scalars layout and the structural-zero note. ``structural`` maps the
    terms that are exactly zero under this configuration to the reason."""

    def __init__(self, run_dir: str | Path, name: str, resume: Optional[tuple[int, float]] = None,
                 structural: Optional[Mapping[str, str]] = None) -> None:
        root = Path(run_dir) / EVENTS_DIR
        earlier = event_files(run_dir)
        self.structural = dict(structural or {})
        self._described: set[tuple[str, str]] = set()
        self.name = run_name(name)
        self.writer = KeptDirectory(SummaryWriter(log_dir=str(root / self.name)))  # survives a deleted tb/
        self._nested: dict[str, KeptDirectory] = {"": self.writer}
        if resume is not None:
            self._carry(earlier, root, *resume)
        else:
            self.writer.add_custom_scalars(custom_scalars_layout())
            if self.structural:
                self.text(tags.STRUCTURALLY_ZERO, "\n".join(
                    f"- **{term}** is exactly 0 under this configuration: {why}; logged once, at step {FIRST_STEP}."
                    for term, why in self.structural.items()), 0)
        self.flush()
        for path in earlier:
            path.unlink()
        kept = {Path(w.log_dir) for w in self._nested.values()}
        for folder in sorted({p.parent for p in earlier} - kept, reverse=True):
            if folder != root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def _run(self, nested: str) -> SummaryWriter:
        """The writer of the nested run ``nested`` (``""``: the run itself), opened on first use."""
        if nested not in self._nested:
            self._nested[nested] = KeptDirectory(SummaryWriter(log_dir=str(Path(self.writer.log_dir) / nested)))
        return self._nested[nested]

    def _carry(self, paths: list[Path], root: Path, step: int, before: float) -> None:
        """Copy the events of ``paths`` up to ``step`` and ``before``, one value per (nested run,
        tag, step): the last one written, in their original order, each into this attempt's
        file of the same nested run."""
        kept: dict[tuple[str, str, int], tuple[float, Any]] = {}
        for path in paths:
            parts = path.relative_to(root).parts
            nested = parts[1] if len(parts) == 3 else ""  # tb/<run>/<nested>/<file>
            for event in LegacyEventFileLoader(str(path)).Load():
                if event.HasField("summary") and event.step <= step and event.wall_time <= before:
                    for value in event.summary.value:
                        kept[(nested, value.tag, event.step)] = (event.wall_time, value)
        for (nested, _, event_step), (wall_time, value) in sorted(kept.items(), key=lambda kv: (kv[1][0], kv[0][2])):
            event = Event()
            event.summary.value.add().CopyFrom(value)
            self._run(nested)._get_file_writer().add_event(event, step=event_step, walltime=wall_time)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text panel (e.g. :data:`bilevel.tags.RUN_EXECUTION`: which path the run takes and why)."""
        self.writer.add_text(tag, text, step)

    def _description(self, tag: str) -> str:
        term = term_of(tag)
        if term in self.structural:
            return f"{describe(tag)} Exactly 0 under this configuration ({self.structural[term]}); logged once."
        return describe(tag)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log scalars (tensors are converted here, at log time, not in the step), each where
        :func:`bilevel.tags.placement` puts it; the first point of each tag carries its
        description. Structurally zero terms: at :data:`FIRST_STEP` only."""
        summaries: dict[str, Summary] = {}
        for tag, value in values.items():
            if step != FIRST_STEP and term_of(tag) in self.structural:
                continue
            nested, written = tags.placement(tag)
            entry = summaries.setdefault(nested, Summary()).value.add(tag=written, simple_value=float(value))
            if (nested, written) not in self._described:
                entry.metadata.CopyFrom(scalar_metadata.create_summary_metadata(written, self._description(tag)))
                self._described.add((nested, written))
        for nested, summary in summaries.items():
            self._run(nested)._get_file_writer().add_summary(summary, step)

    def decomposition(self, decomposition: Decomposition, batch: TaskBatch | GatheredLabels, step: int,
                      images: bool, summary: Optional[Mapping[str, float]] = None) -> None:
        """Log the decomposition's scalars (:func:`bilevel.app.tb.layout.present` of its ``summary``,
        computed here when not given) and, when ``images``, the pair-weight and class-cosine maps
        titled with ``step`` (which read the labels of ``batch``: the meta-batch, or its labels
        gathered from the processes of a distributed run)."""
        if summary is None:
            summary = {k: float(v) for k, v in decomposition.summary().items()}
        self.scalars(present(dict(summary)), step)
        if images:
            fig = pair_weight_figure(decomposition, batch.support_y, batch.query_y, step)
            self.writer.add_figure(tags.PAIR_WEIGHTS_FIGURE, fig, step)
            fig = cosine_figure(decomposition, batch.support_y, batch.query_y, batch.ways, step)
            self.writer.add_figure(tags.CLASS_COSINE_FIGURE, fig, step)
            plt.close("all")

    def hparams(self, values: Mapping[str, Any], swept: Sequence[str], metric_tags: Sequence[str],
                trial: str, sweep: bool = False) -> None:
        """The HPARAMS entry (:func:`bilevel.app.tb.hparams.hparam_summaries`) of trial ``trial``
        (a job of a ``sweep``: the swept keys only)."""
        for summary in hparam_summaries(values, swept, metric_tags, trial, sweep):
            self.writer._get_file_writer().add_summary(summary)

    def flush(self) -> None:
        """Write everything logged so far to disk (before a checkpoint: see the module docstring)."""
        for writer in self._nested.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._nested.values():
            writer.flush()
            writer.close()
