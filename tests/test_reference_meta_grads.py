"""Refactors of the engine must not change any meta-gradient: bit for bit on the ``loop`` path in
float64, against values saved by the engine before the hypergradient-parts restructure
(``tests/reference_meta_grads.py`` documents the cases and how the file was made).

Bit-identity is a property of one kernel library on one instruction set: on a CPU whose
``torch.backends.cpu.get_cpu_capability()`` differs from the one that wrote the file (or another
torch), the comparison is to 1e-13 relative instead — which still fails on any change of the math.
"""
from __future__ import annotations

import sys

import pytest
import torch

import bilevel.algorithm as engine
from bilevel import register
from reference_meta_grads import CASES, DATA, ROOT, compute

SAVED = torch.load(DATA)
SAME_KERNELS = (
    SAVED["__cpu_capability__"] == torch.backends.cpu.get_cpu_capability() and SAVED["__torch__"] == str(torch.__version__)
)


@pytest.fixture(scope="module", autouse=True)
def reptile_registered():
    """The example plugin, registered for this module only (the registry and the import undone)."""
    saved = dict(engine._REGISTRY)
    sys.path.insert(0, str(ROOT / "examples" / "reptile_plugin"))
    from reptile_plugin import Reptile

    register("reptile")(Reptile)
    yield
    engine._REGISTRY.clear()
    engine._REGISTRY.update(saved)
    sys.path.remove(str(ROOT / "examples" / "reptile_plugin"))
    sys.modules.pop("reptile_plugin", None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_meta_gradient_unchanged(name, single_thread):
    now, saved = compute(name), SAVED[name]
    assert sorted(now) == sorted(saved)
    for key, value in saved.items():
        if SAME_KERNELS:
            assert torch.equal(now[key], value), f"{name}: {key} differs from the saved value (max |Δ| = {(now[key] - value).abs().max():.3e})"
        else:
            assert torch.allclose(now[key], value, rtol=1e-13, atol=1e-15), f"{name}: {key}"
