"""Decompose a trained run's meta-gradient on fresh tasks and save the two figures.

    python examples/inspect_run.py RUN_DIR [--out DIR] [--split val] [--tasks 8]

Loads ``RUN_DIR/config.yaml`` and ``RUN_DIR/checkpoint.pt``, samples a meta-batch from the
split, prints the decomposition summary (the numbers TensorBoard shows) and writes
``pair_weights.png`` and ``class_cosine.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf

from bilevel import build_algorithm, build_model
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.data import build_sampler, input_shape
from bilevel.app.tb.figures import cosine_figure, pair_weight_figure
from bilevel.app.head_policy import before_outer_step
from bilevel.app.config.schema import typed_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="figure directory (default: RUN_DIR)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    cfg = typed_config(OmegaConf.load(args.run_dir / "config.yaml"))
    state = load_checkpoint(args.run_dir / "checkpoint.pt", torch.device("cpu"))
    model = build_model(cfg.model, input_shape(cfg.data), cfg.data.ways)
    params = {k: v.to(torch.float32) for k, v in state["params"].items()}
    before_outer_step(params, cfg.head.policy)
    algorithm = build_algorithm(cfg.algorithm, model)
    batch = build_sampler(cfg.data, args.split, args.tasks, seed=cfg.seed + 1).sample()
    decomposition = algorithm.meta_grad(params, batch, decompose=True).decomposition
    for tag, value in decomposition.summary().items():
        print(f"{tag:40s} {float(value): .4e}")
    out = args.out or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    pair_weight_figure(decomposition, batch.support_y, batch.query_y).savefig(out / "pair_weights.png", dpi=120)
    cosine_figure(decomposition, batch.support_y, batch.query_y, batch.ways).savefig(out / "class_cosine.png", dpi=120)
    plt.close("all")
    print(f"wrote {out / 'pair_weights.png'} and {out / 'class_cosine.png'}")


if __name__ == "__main__":
    main()
