"""TensorBoard logging of a run: scalars, decomposition panels, figures, text and HPARAMS.

Each attempt of a run writes one event file. A resumed attempt first copies into it the
earlier attempts' events that the checkpoint it resumes had seen — logged at or before its
step and before it was written — and removes the earlier files, so every curve is monotone
with one point per step; a new run removes the files of attempts that never checkpointed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import matplotlib.pyplot as plt
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from .config import flatten
from .decompose import Decomposition
from .figures import cosine_figure, pair_weight_figure

EVENT_FILES = "events.out.tfevents.*"


class RunLogger:
    """A SummaryWriter in ``run_dir/tb`` with helpers for the framework's panels.

    ``resume=(step, time)``: carry the earlier events logged at or before ``step`` and before
    wall time ``time`` (when the resumed checkpoint was written); None: a new run."""

    def __init__(self, run_dir: str | Path, resume: Optional[tuple[int, float]] = None) -> None:
        directory = Path(run_dir) / "tb"
        earlier = sorted(directory.glob(EVENT_FILES))
        self.writer = SummaryWriter(log_dir=str(directory))
        if resume is not None:
            self._carry(earlier, *resume)
        self.writer.flush()
        for path in earlier:
            path.unlink()

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
        """A text panel (e.g. ``run/execution``: which path the run takes and why)."""
        self.writer.add_text(tag, text, step)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Log scalars (tensors are converted here, at log time, not in the step)."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def decomposition(self, decomposition: Decomposition, batch: Any, step: int, images: bool) -> dict[str, float]:
        """Log ``decomp/*``, ``pairs/*``, ``features/*`` and, when ``images``, the two maps."""
        summary = {k: float(v) for k, v in decomposition.summary().items()}
        self.scalars(summary, step)
        if images:
            fig = pair_weight_figure(decomposition, batch.support_y, batch.query_y)
            self.writer.add_figure("pairs/weights", fig, step)
            fig = cosine_figure(decomposition, batch.support_y, batch.query_y, batch.ways)
            self.writer.add_figure("features/class_cosine", fig, step)
            plt.close("all")
        return summary

    def hparams(self, config: Any, metrics: Mapping[str, float]) -> None:
        """HPARAMS tab: the flattened config and the final metrics."""
        tree = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
        flat = {k: v if isinstance(v, (int, float, str, bool, Tensor)) else str(v) for k, v in flatten(tree or {}).items()}
        self.writer.add_hparams(flat, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name=".")

    def flush(self) -> None:
        """Write everything logged so far to disk (before a checkpoint: see the module docstring)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
