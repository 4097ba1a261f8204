"""The summary a finished run prints: what it trained, how it did, where everything is.

    finished maml on glyphs 5-way 1-shot (2 inner steps, 3 at test): 400 steps in 2 min 41 s
      (training 1 min 58 s, evaluation 43 s)
    test accuracy after 2 inner steps: 0.912 ± 0.011 (95 % CI over 200 tasks of the test split; chance 0.200)
      inner steps        0              1              2              3
      head as trained    0.200 ± 0.000  0.876 ± 0.013  0.912 ± 0.011  0.905 ± 0.012
      zeroed head        ...
    run directory: /abs/outputs/2026-11-30/02-10-11
    log file:      /abs/outputs/2026-11-30/02-10-11/train.log
    TensorBoard:   tensorboard --logdir /abs/outputs/2026-11-30/02-10-11/tb  (raw values: open it at ...?smoothing=0)
    report:        bilevel-report /abs/outputs/2026-11-30/02-10-11  (writes .../report/report.html)

Accuracies are means over the test tasks with the half-width ``1.96 · sd / √n`` of their 95 %
confidence interval (:func:`bilevel.app.evaluation.ci95`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor

from bilevel import tags
from bilevel.algorithm import BilevelAlgorithm
from bilevel.app.evaluation import Evaluation, ci95
from bilevel.decomposition.ablation import Ablation


def duration(seconds: float) -> str:
    """``41 s``, ``2 min 31 s``, ``1 h 02 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def accuracy_table(evaluation: Evaluation) -> list[str]:
    """Accuracy ± 95 % CI after every test-time inner step, head as trained and zeroed."""
    steps = evaluation.plain.shape[1]
    width = len("0.000 ± 0.000")
    rows = [("inner steps", [str(k).ljust(width) for k in range(steps)])]
    for label, accs in (("head as trained", evaluation.plain), ("zeroed head", evaluation.zeroed)):
        mean, half = accs.mean(0), ci95(accs)
        rows.append((label, [f"{float(m):.3f} ± {float(h):.3f}" for m, h in zip(mean, half)]))
    return ["  " + label.ljust(17) + "  ".join(cells).rstrip() for label, cells in rows]


def inner_steps(k: int) -> str:
    """``1 inner step``, ``2 inner steps``."""
    return f"{k} inner step{'s' if k != 1 else ''}"


def after_steps(k: int) -> str:
    """``after 2 inner steps``."""
    return f"after {inner_steps(k)}"


def headline_value(accs: Tensor, k: int) -> str:
    """``0.912 ± 0.011``: the mean over tasks after ``k`` steps and its 95 % CI half-width."""
    return f"{float(accs.mean(0)[k]):.3f} ± {float(ci95(accs)[k]):.3f}"


def headline(evaluation: Evaluation, split: str, ways: int) -> str:
    """``test accuracy after 2 inner steps: 0.912 ± 0.011 (95 % CI over 200 tasks ...)``."""
    return (f"test accuracy {after_steps(evaluation.headline)}: {headline_value(evaluation.plain, evaluation.headline)} "
            f"(95 % CI over {evaluation.tasks} tasks of the {split} split; chance {1 / ways:.3f})")


def evaluation_line(evaluation: Evaluation, split: str) -> str:
    """``eval accuracy after 2 inner steps 0.912 ± 0.011 (per step 0.200 0.876 0.912 0.905;
    zeroed head 0.910 ± 0.011; 60 val tasks)``."""
    k = evaluation.headline
    per_step = " ".join(f"{float(a):.3f}" for a in evaluation.plain.mean(0))
    return (f"eval accuracy {after_steps(k)} {headline_value(evaluation.plain, k)} (per step {per_step}; "
            f"zeroed head {headline_value(evaluation.zeroed, k)}; {evaluation.tasks} {split} tasks)")


def run_title(cfg: DictConfig, algorithm: BilevelAlgorithm, ablation: Optional[Ablation] = None,
              preset: str = "") -> str:
    """``maml on glyphs 5-way 1-shot (2 inner steps, 3 at test)``; a ``preset`` asked for under another
    name says which algorithm it is (``anil (maml, adapt=head) on ...``), an ablation what the
    encoder follows (``..., ablation contrastive_only: the encoder follows contrastive``)."""
    name = algorithm.name
    if preset and preset != algorithm.name:
        adapt = cfg.algorithm.get("adapt")
        name = f"{preset} ({algorithm.name}{'' if adapt is None else f', adapt={adapt}'})"
    title = (f"{name} on {cfg.data.name} {cfg.data.ways}-way {cfg.data.shots}-shot "
             f"({inner_steps(algorithm.train_steps)}, {algorithm.eval_steps} at test)")
    if ablation is not None and not ablation.plain:
        title += f", ablation {cfg.ablation.name}: the encoder follows {' + '.join(ablation.kept)}"
    return title


ROUND_OFF = {torch.float64: 1e-10}
"""Where round-off ends for the decomposition's checks, by dtype (anything else: 1e-5, float32's)."""


def identity_line(summary: Mapping[str, float], dtype: torch.dtype) -> str:
    """``identity check 3.1e-07, reconstruction 8.2e-07: round-off (below 1e-05 in float32)``: the
    decomposition's two checks (:data:`bilevel.tags.CHECK_IDENTITY`: ‖Σ terms − g‖ / ‖g‖; the eq. (1)
    logit error) from a ``Decomposition.summary()``, and whether they are at round-off. Above it in
    float32 the line names the other cause than a missing term: float32's own round-off, larger than
    1e-5 for oneDNN's convolution weight gradients of a trained ResNet-12 at 84×84 (1.7e-5; 2.1e-6
    with ``cpu_conv=native``)."""
    bound = ROUND_OFF.get(dtype, 1e-5)
    identity, rebuilt = summary[tags.CHECK_IDENTITY], summary[tags.CHECK_RECONSTRUCTION]
    fine = all(math.isfinite(v) and abs(v) < bound for v in (identity, rebuilt))
    verdict = "round-off" if fine else "ABOVE round-off: the terms do not add up to the meta-gradient"
    if not fine and dtype != torch.float64 and all(math.isfinite(v) for v in (identity, rebuilt)):
        verdict += (" or float32 round-off is larger for this model (oneDNN's CPU convolutions on large images: "
                    "cpu_conv=native); dtype=float64 tells them apart")
    return (f"decomposition identity check |sum of terms - meta-gradient| / |meta-gradient| = {identity:.1e}, "
            f"reconstruction {rebuilt:.1e}: {verdict} (below {bound:.0e} in {str(dtype).removeprefix('torch.')})")


RAW_URL = "http://localhost:6006/?smoothing=0"
"""TensorBoard's address with its smoothing off (its default, 0.6, cannot be set in the event files)."""


@dataclass(frozen=True)
class Timing:
    """An attempt's span: from step ``start`` (0, or where it resumed) to ``steps``, ``wall_s``
    seconds of which ``eval_s`` evaluating."""

    start: int
    steps: int
    wall_s: float
    eval_s: float


@dataclass(frozen=True)
class Places:
    """Where a run's record is: its directory, its log file (None outside a Hydra run), its
    TensorBoard events and, for a sweep's job, the sweep's directory."""

    run_dir: Path
    log_file: Optional[Path]
    events_dir: Path
    sweep_dir: str = ""


def run_summary(what: str, evaluation: Evaluation, split: str, ways: int, timing: Timing, places: Places) -> str:
    """The whole summary (see the module docstring): times are this attempt's (a resumed run
    started at step ``timing.start``); a sweep's job also names the sweep's commands."""
    start, steps, wall_s, eval_s = timing.start, timing.steps, timing.wall_s, timing.eval_s
    run_dir = places.run_dir
    done = f"{steps} steps" if start == 0 else f"{steps} steps ({steps - start} in this attempt, resumed at {start})"
    lines = [
        f"finished {what}: {done} in {duration(wall_s)} "
        f"(training {duration(wall_s - eval_s)}, evaluation {duration(eval_s)})",
        headline(evaluation, split, ways),
        *accuracy_table(evaluation),
        f"run directory: {run_dir}",
    ]
    if places.log_file is not None:
        lines.append(f"log file:      {places.log_file}")
    lines.append(f"TensorBoard:   tensorboard --logdir {places.events_dir}  (raw values: open it at {RAW_URL})")
    lines.append(f"report:        bilevel-report {run_dir}  (writes {run_dir / 'report' / 'report.html'})")
    if places.sweep_dir:
        lines.append(f"the sweep:     tensorboard --logdir {places.sweep_dir}; bilevel-report {places.sweep_dir}")
    return "\n".join(lines)
