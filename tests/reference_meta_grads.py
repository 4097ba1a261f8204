"""The meta-gradients that must survive engine refactors bit for bit (float64, ``loop`` path).

``cases()`` lists the algorithms and configurations; ``compute(case)`` runs one plain meta-step
on a seeded tiny problem and returns its gradient. ``python tests/reference_meta_grads.py``
writes ``tests/data/reference_meta_grads.pt``; the file in the repository was written by the
engine before the hypergradient-parts restructure (commit f8a9904) and
``tests/test_reference_meta_grads.py`` compares today's engine with it (``compute`` follows the
engine's API; the saved values do not change).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "reference_meta_grads.pt"

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "maml_so_all": ("mlp", {"name": "maml", "inner_steps": 2}),
    "maml_so_all_conv4": ("conv4", {"name": "maml", "inner_steps": 2}),
    "maml_fo_all_conv4": ("conv4", {"name": "maml", "inner_steps": 2, "order": "first_order"}),
    "maml_momentum": ("mlp", {"name": "maml", "inner_steps": 3, "inner_momentum": 0.5}),
    "anil_conv4": ("conv4", {"name": "maml", "inner_steps": 3, "adapt": "head"}),
    "imaml_head_conv4": ("conv4", {"name": "imaml"}),
    "imaml_all": ("mlp", {"name": "imaml", "adapt": "all", "inner_steps": 4, "inner_lr": 0.05}),
    "entropy_sgd_all": ("mlp", {"name": "entropy_sgd", "inner_steps": 3, "noise": 0.01}),
    "entropy_sgd_head_conv4": ("conv4", {"name": "entropy_sgd", "inner_steps": 3, "adapt": "head"}),
    "reptile_all": ("mlp", {"name": "reptile", "inner_steps": 3}),
}


def problem(model_name: str):
    """A seeded float64 problem: 3-way, 2-shot, 3 queries, 2 tasks (:func:`bilevel.testing.seeded_problem`)."""
    from bilevel.testing import seeded_problem

    p = seeded_problem(model_name, shots=2, queries=3, seed=0, batch_seed=1)
    return p.model, p.params, p.batch


def compute(name: str) -> dict[str, torch.Tensor]:
    """The plain meta-gradient of case ``name`` on the ``loop`` path (plus its loss)."""
    from bilevel import build_algorithm

    model_name, config = CASES[name]
    model, params, batch = problem(model_name)
    algorithm = build_algorithm(config, model, execution="loop")
    step = algorithm.meta_grad(params, batch)
    return {**{k: v.detach().clone() for k, v in step.grad.items()}, "__loss__": step.loss.detach().clone()}


def main() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "reptile_plugin")]
    from bilevel.algorithm import register
    from reptile_plugin import Reptile

    register("reptile")(Reptile)
    torch.set_num_threads(1)
    values = {name: compute(name) for name in CASES}
    values["__cpu_capability__"] = torch.backends.cpu.get_cpu_capability()
    values["__torch__"] = str(torch.__version__)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    torch.save(values, DATA)
    print(f"wrote {len(CASES)} cases to {DATA}")


if __name__ == "__main__":
    main()
