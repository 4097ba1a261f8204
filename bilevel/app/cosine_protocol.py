"""The paper's cosine-similarity measurement (Kao, Chiu & Chen, ICLR 2022, §3.3 / Fig. 3).

**Protocol.** Features of the *meta-parameters* θ (no inner-loop adaptation) on **one fixed
task** drawn once from ``cosine.split`` with ``cosine.task_seed`` (the same task for every run
seed and arm), ``ways``-way with ``cosine.shots`` support and ``cosine.queries`` query samples
per class (the paper: 20/20 on mini-ImageNet; glyphs and Omniglot hold 20 drawings per class,
so at most 10/10 there). Support and query sets are encoded in separate forward passes, as
the inner and outer loops encode them (BatchNorm uses each set's own statistics). Recorded
after each outer update count in ``cosine.steps`` (0: at initialisation).

**Heat maps.** With unit-normalised features ``ẑ = φ_θ(x) / ‖φ_θ(x)‖`` the class-pair means

    QS[i, j] = mean_{q ∈ Q_i, s ∈ S_j} ⟨ẑ_q, ẑ_s⟩          (query class i vs support class j)
    QQ[i, j] = mean_{q ∈ Q_i, q' ∈ Q_j, q' ≠ q} ⟨ẑ_q, ẑ_q'⟩ (query vs query; self-pairs excluded)

are stored per step in ``cosine_probe.json`` of the run directory; the report
(:mod:`bilevel.report.study_figures`) lays them side by side as the paper's ``ways × (2·ways + 1)``
map (5 × 11 for 5-way: QS, a blank column, QQ), averaged over seeds. The file is rewritten
atomically after every recorded step, so a resumed run keeps what its earlier attempts
measured.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from bilevel.data import DataConfig, TaskBatch, build_sampler
from bilevel.data.dataset import SPLITS
from bilevel.files import atomic_write_text
from bilevel.primitives.models import BilevelModel
from bilevel.primitives.params import Params, encoder_part
from bilevel.run_files import PROBE_FILE
from bilevel.validate import AT_LEAST_1, NON_NEGATIVE, Check, OneOf


@dataclass
class CosineConfig:
    """The cosine probe (module docstring). ``steps`` empty: off."""

    checks: ClassVar[dict[str, Check]] = {
        "shots": AT_LEAST_1, "queries": AT_LEAST_1, "split": OneOf(SPLITS), "task_seed": NON_NEGATIVE,
    }

    steps: list[int] = field(default_factory=list)
    shots: int = 10
    queries: int = 10
    split: str = "val"
    task_seed: int = 0


def class_pair_means(sims: Tensor, row_labels: Tensor, col_labels: Tensor, ways: int,
                     exclude_self: bool = False) -> Tensor:
    """``M[i, j]`` = mean of ``sims[a, b]`` over rows ``a`` of label ``i`` and columns ``b`` of label
    ``j`` (with ``exclude_self`` the diagonal ``a == b`` of a square ``sims`` is left out); NaN
    where no pair exists."""
    rows = torch.nn.functional.one_hot(row_labels, ways).to(sims.dtype)
    cols = torch.nn.functional.one_hot(col_labels, ways).to(sims.dtype)
    mask = torch.ones_like(sims)
    if exclude_self:
        mask.fill_diagonal_(0.0)
    sums = rows.T @ (sims * mask) @ cols
    counts = rows.T @ mask @ cols
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(sums, float("nan")))


def heat_maps(support: Tensor, query: Tensor, support_y: Tensor, query_y: Tensor, ways: int) -> dict[str, Tensor]:
    """``{"query_support": QS, "query_query": QQ}`` ``[ways, ways]`` from features ``[n, d]``."""
    zs = torch.nn.functional.normalize(support, dim=1)
    zq = torch.nn.functional.normalize(query, dim=1)
    return {
        "query_support": class_pair_means(zq @ zs.T, query_y, support_y, ways),
        "query_query": class_pair_means(zq @ zq.T, query_y, query_y, ways, exclude_self=True),
    }


class CosineProbe:
    """Records :func:`heat_maps` of the fixed task at the configured outer-step counts."""

    def __init__(self, cfg: CosineConfig, data: DataConfig, model: BilevelModel, run_dir: Optional[Path],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.steps = sorted(set(int(s) for s in cfg.steps))
        self.model, self.path = model, None if run_dir is None else Path(run_dir) / PROBE_FILE
        self.ways = data.ways
        self.protocol = {"shots": cfg.shots, "queries": cfg.queries, "split": cfg.split, "task_seed": cfg.task_seed,
                         "ways": data.ways, "steps": self.steps}
        self.task: Optional[TaskBatch] = None
        if self.steps:
            probe_data = DataConfig(**{**_plain(data), "shots": cfg.shots, "queries": cfg.queries,
                                       "fixed_blocks": False, "train_classes": None})
            try:
                sampler = build_sampler(probe_data, cfg.split, 1, seed=cfg.task_seed)
            except ValueError as error:
                raise ValueError(f"cosine probe: {error} (set cosine.shots / cosine.queries)") from None
            self.task = sampler.sample().to(device, dtype)
        self.recorded: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("protocol") == self.protocol:
                return dict(saved.get("steps", {}))
        return {}

    @torch.no_grad()
    def measure(self, params: Params) -> dict[str, Tensor]:
        """The heat maps of the fixed task with the features of ``params`` (no adaptation)."""
        assert self.task is not None
        encoder, t = encoder_part(params), self.task
        support = self.model.encode(encoder, t.support_x[0])
        query = self.model.encode(encoder, t.query_x[0])
        return heat_maps(support.double(), query.double(), t.support_y[0], t.query_y[0], self.ways)

    def after_update(self, done: int, params: Params) -> None:
        """Record (and save) the maps when ``done`` outer updates is one of the probe's steps."""
        if done not in self.steps:
            return
        maps = self.measure(params)
        self.recorded[str(done)] = {k: v.cpu().tolist() for k, v in maps.items()}
        if self.path is not None:
            atomic_write_text(json.dumps({"protocol": self.protocol, "steps": self.recorded}, indent=1), self.path)


def _plain(data: Any) -> dict[str, Any]:
    """A data config (dataclass or DictConfig) as a plain dict of :class:`DataConfig` fields."""
    if is_dataclass(data):
        return asdict(data)
    return {f.name: data[f.name] for f in fields(DataConfig) if f.name in data}

