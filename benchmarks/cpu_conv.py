"""Time and float32 identity of a second-order MAML meta-gradient with oneDNN's CPU convolutions
against PyTorch's native ones (``cpu_conv=onednn|native``, ``torch.backends.mkldnn.enabled``).

Per backbone (conv4 at 28×28, resnet12 at 84×84), on Gaussian images at the initial parameters,
``execution=loop``:

* **Time**: ``meta_grad`` with each kernel set, round-robin in the same run (``common.time_methods``);
  ``ratio`` is native / oneDNN.
* **Identity**: ``‖Σ terms − g‖ / ‖g‖`` of one decomposed meta-gradient with each kernel set, and
  the relative difference of the two meta-gradients (the same math, other round-off).

At initialisation both identities are small; the difference shows at trained parameters, where
convolution weight gradients in front of BatchNorm are small sums of large products
(``docs/models.md``, "Training at this scale"): measure that with the training run
(``train.decompose_every``) and ``cpu_conv=native``.

    PYTHONPATH=. python benchmarks/cpu_conv.py --threads 1 --out benchmarks/results/cpu_conv.json
"""
from __future__ import annotations

import argparse
from typing import Any

from common import add_common_args, finish, grad_rel_diff, make_batch, print_table, start, time_methods

CELLS = {  # backbone: (image shape, inner steps, inner lr, queries per class, meta-batch)
    "conv4": ((1, 28, 28), 1, 0.4, 15, 4),
    "resnet12": ((3, 84, 84), 5, 0.01, 5, 2),
}
KERNELS = ("onednn", "native")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--backbones", nargs="+", default=list(CELLS), choices=tuple(CELLS))
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    return parser.parse_args()


def with_kernels(kernels: str, fn):
    """``fn`` run with oneDNN's convolutions on (``onednn``) or off (``native``)."""
    import torch

    def call() -> Any:
        torch.backends.mkldnn.enabled = kernels == "onednn"
        try:
            return fn()
        finally:
            torch.backends.mkldnn.enabled = True

    return call


def measure(run, args: argparse.Namespace, backbone: str) -> dict[str, Any]:
    """One backbone's row: time per kernel set, their ratio, identities and gradient difference."""
    import torch

    from bilevel import ModelConfig, build_algorithm, build_model

    shape, steps, lr, queries, tasks = CELLS[backbone]
    model = build_model(ModelConfig(name=backbone), shape, args.ways).to(run.device, run.dtype)
    params = {k: v.to(run.device) for k, v in model.init_params().items()}
    batch = make_batch(tasks, args.ways, args.shots, queries, shape, run.device, run.dtype, run.generator)
    algo = build_algorithm({"name": "maml", "inner_steps": steps, "inner_lr": lr}, model).with_execution("loop")
    decomposed = {k: with_kernels(k, lambda: algo.meta_grad(params, batch, decompose=True))() for k in KERNELS}
    steps_by_kernel = {k: with_kernels(k, lambda: algo.meta_grad(params, batch)) for k in KERNELS}
    _, times = time_methods(steps_by_kernel, steps_by_kernel, run.device, args)
    return {
        "backbone": backbone, "image": "x".join(map(str, shape)), "inner_steps": steps, "meta_batch": tasks,
        "queries": queries, **{f"{k}_s": times[k]["median_s"] for k in KERNELS},
        "ratio": times["native"]["median_s"] / times["onednn"]["median_s"],
        **{f"identity_{k}": float(decomposed[k].decomposition.identity_error) for k in KERNELS},
        "grad_diff": grad_rel_diff(decomposed["native"].grad, decomposed["onednn"].grad),
        "times": {k: times[k] for k in KERNELS}, "torch_mkldnn_available": torch.backends.mkldnn.is_available(),
    }


def main() -> None:
    args = parse_args()
    run = start(args)
    rows = [measure(run, args, backbone) for backbone in args.backbones]
    print_table(["backbone", "image", "onednn s", "native s", "native/onednn", "identity onednn",
                 "identity native", "grad diff"],
                [[r["backbone"], r["image"], r["onednn_s"], r["native_s"], r["ratio"], r["identity_onednn"],
                  r["identity_native"], r["grad_diff"]] for r in rows])
    finish(run.env, rows, {r["backbone"]: r["ratio"] for r in rows}, args)


if __name__ == "__main__":
    main()
