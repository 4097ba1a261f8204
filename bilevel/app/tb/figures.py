"""Figures of a decomposition: pair-weight matrix and class × class cosine-similarity map, titled
with the step they are logged at, in fonts that read at TensorBoard's image size (:data:`FONTS`)."""
from __future__ import annotations

from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from bilevel.decomposition.record import Decomposition  # noqa: E402

FONTS = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 11, "ytick.labelsize": 11}
"""Font sizes of the figures (matplotlib's default 10 is unreadable at TensorBoard's image size)."""


def _titled(what: str, step: Optional[int]) -> str:
    return what if step is None else f"{what}, step {step}"


def pair_weight_figure(decomposition: Decomposition, support_y: Tensor, query_y: Tensor,
                       step: Optional[int] = None) -> Figure:
    """``Σ_τ C_τ[s, q]`` of the first task, rows/columns sorted by label. Blue: negative
    weight (the pair attracts: the surrogate falls as their similarity grows); red: repel."""
    weights = decomposition.pair_weights[0].sum(0).detach().float().cpu()
    s_order = torch.argsort(support_y[0].cpu(), stable=True)
    q_order = torch.argsort(query_y[0].cpu(), stable=True)
    weights = weights[s_order][:, q_order]
    bound = float(weights.abs().max()) or 1.0
    with plt.rc_context(FONTS):
        fig, ax = plt.subplots(figsize=(5.4, 3.6))
        im = ax.imshow(weights.numpy(), cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_xlabel("query sample (sorted by label)")
        ax.set_ylabel("support sample (sorted by label)")
        ax.set_title(_titled("pair weights C[s, q] of task 0", step))
        fig.colorbar(im, ax=ax, label="attract (−)  /  repel (+)")
        fig.tight_layout()
    return fig


def class_cosine_matrix(cosines: Tensor, support_y: Tensor, query_y: Tensor, ways: int) -> Tensor:
    """Mean cosine between support samples of label ``i`` and query samples of label ``j``."""
    s_onehot = torch.nn.functional.one_hot(support_y, ways).to(cosines.dtype)
    q_onehot = torch.nn.functional.one_hot(query_y, ways).to(cosines.dtype)
    sums = torch.einsum("tsi,tsq,tqj->ij", s_onehot, cosines, q_onehot)
    counts = torch.einsum("tsi,tqj->ij", s_onehot, q_onehot)
    return sums / counts.clamp_min(1.0)


def cosine_figure(decomposition: Decomposition, support_y: Tensor, query_y: Tensor, ways: int,
                  step: Optional[int] = None) -> Figure:
    """Query-label × support-label mean cosine similarity of features (mean over tasks)."""
    matrix = class_cosine_matrix(decomposition.feature_cosines.detach(), support_y, query_y, ways)
    with plt.rc_context(FONTS):
        fig, ax = plt.subplots(figsize=(4.4, 3.6))
        im = ax.imshow(matrix.T.float().cpu().numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xlabel("support label")
        ax.set_ylabel("query label")
        ax.set_title(_titled("feature cosine similarity", step))
        fig.colorbar(im, ax=ax, label="cosine")
        fig.tight_layout()
    return fig
