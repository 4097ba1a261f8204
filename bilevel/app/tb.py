"""TensorBoard logging of a run: scalars with descriptions, the custom-scalars layout,
decomposition panels, figures, text and HPARAMS (what each tag is: :mod:`bilevel.app.tb_layout`).

Events go to ``run_dir/tb/<name>/``, so TensorBoard names the run after the experiment
(:func:`run_name`). Each attempt of a run writes one event file. A resumed attempt first copies
into it the earlier attempts' events that the checkpoint it resumes had seen — logged at or
before its step and before it was written — and removes the earlier files, so every curve is
monotone with one point per step; a new run removes the files of attempts that never
checkpointed.

A term that is exactly zero by construction under the run's configuration
(:func:`bilevel.decomposition.structural.structural_zeros`) is logged once, at step 0, with the reason in its
description and in the text panel :data:`bilevel.tags.STRUCTURALLY_ZERO`, instead of as a flat line.
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
from bilevel.app.distributed import GatheredLabels
from bilevel.app.figures import cosine_figure, pair_weight_figure
from bilevel.app.tb_hparams import hparam_summaries
from bilevel.app.tb_layout import custom_scalars_layout, describe, present, term_of

EVENTS_DIR = "tb"
EVENT_FILES = "events.out.tfevents.*"


NAME_CHARS = 80


def run_name(name: str) -> str:
    """``name`` as one directory name (TensorBoard's run name): ``/`` and spaces become ``_``;
    beyond :data:`NAME_CHARS` characters, its start and a hash of the whole."""
    safe = re.sub(r"[/\\\s]+", "_", name).strip("._") or "run"
    if len(safe) <= NAME_CHARS:
        return safe
    return f"{safe[:NAME_CHARS - 12]}...{hashlib.sha1(safe.encode()).hexdigest()[:8]}"


def event_files(run_dir: str | Path) -> list[Path]:
    """Every event file of a run directory, at any depth under ``tb/``."""
    return sorted((Path(run_dir) / EVENTS_DIR).rglob(EVENT_FILES))


class RunLogger:
    """A SummaryWriter in ``run_dir/tb/<name>`` with helpers for the framework's panels.

    ``resume=(step, time)``: carry the earlier events logged at or before ``step`` and before
    wall time ``time`` (when the resumed checkpoint was written); None: a new run, which also
    writes the custom-scalars layout and the structural-zero note. ``structural`` maps the
    terms that are exactly zero under this configuration to the reason."""

    def __init__(self, run_dir: str | Path, name: str, resume: Optional[tuple[int, float]] = None,
                 structural: Optional[Mapping[str, str]] = None) -> None:
        root = Path(run_dir) / EVENTS_DIR
        earlier = event_files(run_dir)
        self.structural = dict(structural or {})
        self._described: set[str] = set()
        self.name = run_name(name)
        self.writer = KeptDirectory(SummaryWriter(log_dir=str(root / self.name)))  # survives a deleted tb/
        if resume is not None:
            self._carry(earlier, *resume)
        else:
            self.writer.add_custom_scalars(custom_scalars_layout())
            if self.structural:
                self.text(tags.STRUCTURALLY_ZERO, "\n".join(
                    f"- **{term}** is exactly 0 under this configuration: {why}; logged once, at step 0."
                    for term, why in self.structural.items()), 0)
        self.writer.flush()
        for path in earlier:
            path.unlink()
        for folder in sorted({p.parent for p in earlier} - {Path(self.writer.log_dir)}, reverse=True):
            if folder != root and not any(folder.iterdir()):
                folder.rmdir()

    def _carry(self, paths: list[Path], step: int, before: float) -> None:
        """Copy the events of ``paths`` up to ``step`` and ``before``, one value per (tag, step):
        the last one written, in their original order."""
        kept: dict[tuple[str, int], tuple[float, Any]] = {}
        for path in paths:
            for event in LegacyEventFileLoader(str(path)).Load():
                if event.HasField("summary") and event.step <= step and event.wall_time <= before:
                    for value in event.summary.value:
                        kept[(value.tag, event.step)] = (event.wall_time, value)
        file_writer = self.writer._get_file_writer()  # the raw-event writer of this attempt's file
        for (_, event_step), (wall_time, value) in sorted(kept.items(), key=lambda kv: (kv[1][0], kv[0][1])):
            event = Event()
            event.summary.value.add().CopyFrom(value)
            file_writer.add_event(event, step=event_step, walltime=wall_time)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text panel (e.g. :data:`bilevel.tags.RUN_EXECUTION`: which path the run takes and why)."""
        self.writer.add_text(tag, text, step)

    def _description(self, tag: str) -> str:
        term = term_of(tag)
        if term in self.structural:
            return f"{describe(tag)} Exactly 0 under this configuration ({self.structural[term]}); logged once."
        return describe(tag)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log scalars (tensors are converted here, at log time, not in the step); the first
        point of each tag carries its description. Structurally zero terms: step 0 only."""
        summary = Summary()
        for tag, value in values.items():
            if step > 0 and term_of(tag) in self.structural:
                continue
            entry = summary.value.add(tag=tag, simple_value=float(value))
            if tag not in self._described:
                entry.metadata.CopyFrom(scalar_metadata.create_summary_metadata(tag, self._description(tag)))
                self._described.add(tag)
        if summary.value:
            self.writer._get_file_writer().add_summary(summary, step)

    def decomposition(self, decomposition: Decomposition, batch: TaskBatch | GatheredLabels, step: int,
                      images: bool) -> None:
        """Log the decomposition's scalars (:func:`bilevel.app.tb_layout.present`) and, when
        ``images``, the pair-weight and class-cosine maps (which read the labels of ``batch``:
        the meta-batch, or its labels gathered from the processes of a distributed run)."""
        self.scalars(present({k: float(v) for k, v in decomposition.summary().items()}), step)
        if images:
            fig = pair_weight_figure(decomposition, batch.support_y, batch.query_y)
            self.writer.add_figure(tags.PAIR_WEIGHTS_FIGURE, fig, step)
            fig = cosine_figure(decomposition, batch.support_y, batch.query_y, batch.ways)
            self.writer.add_figure(tags.CLASS_COSINE_FIGURE, fig, step)
            plt.close("all")

    def hparams(self, values: Mapping[str, Any], swept: Sequence[str], metric_tags: Sequence[str],
                trial: str) -> None:
        """The HPARAMS entry (:func:`bilevel.app.tb_hparams.hparam_summaries`) of trial ``trial``."""
        for summary in hparam_summaries(values, swept, metric_tags, trial):
            self.writer._get_file_writer().add_summary(summary)

    def flush(self) -> None:
        """Write everything logged so far to disk (before a checkpoint: see the module docstring)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
