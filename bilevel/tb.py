"""TensorBoard logging of a run: scalars, decomposition panels, figures and HPARAMS."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from .decompose import Decomposition
from .figures import cosine_figure, pair_weight_figure


class RunLogger:
    """A SummaryWriter in ``run_dir/tb`` with helpers for the framework's panels."""

    def __init__(self, run_dir: str | Path) -> None:
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

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
        flat = _flatten(OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config)
        self.writer.add_hparams(flat, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or isinstance(value, Tensor):
            out[name] = value
        else:
            out[name] = str(value)
    return out
