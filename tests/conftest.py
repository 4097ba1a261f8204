"""Shared fixtures of the engine's correctness tests: thin wrappers around :mod:`bilevel.testing`.

* ``make_problem``: :func:`bilevel.testing.seeded_problem` — a tiny seeded model (``mlp``
  hidden 8 on 4-d inputs, or ``conv4`` with 4 channels on 1×16×16 images), its parameters
  (random head, or the zeroing trick ``W = b = 0``) and a Gaussian few-shot batch whose labels
  are laid out class by class.
* ``reference``: the independent plain-autograd MAML of :mod:`bilevel.testing` (``adapt``,
  ``meta_loss``, ``meta_grad``); it shares nothing with the engine but the model definition, so
  engine gradients are checked against it, and it is itself checked against finite differences.
* ``rel_err``: :func:`bilevel.testing.rel_err`, ``‖a − b‖ / ‖b‖`` as a float.
* ``onednn_kernels`` (every test): a run with ``cpu_conv=native`` turns oneDNN's CPU
  convolutions off process-wide; they are back on after each test.
* ``single_thread``: run a test with one intra-op thread (restored afterwards). On a shared,
  oversubscribed CPU the tiny kernels here run much faster that way than with spinning
  OpenMP workers.

The suite never touches the user's cache: unless ``BILEVEL_CACHE`` is set, it points at a
directory of the tests' own under the temporary directory (``bilevel-tests-<uid>``; kept between
sessions so the glyph pool is built once), so the tests' tiny-problem timings never land in
``~/.cache/bilevel/execution.json``. torch scripts its forward-mode decompositions with the
deprecated ``torch.jit.script`` the first time ``torch.func.jacfwd``/``hessian`` runs (18
warnings from ``torch._decomp.decompositions_for_jvp``, used by ``theory_checks``); that module is
imported here once with exactly that warning silenced.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

if not os.environ.get("BILEVEL_CACHE"):
    os.environ["BILEVEL_CACHE"] = os.path.join(tempfile.gettempdir(), f"bilevel-tests-{os.getuid()}")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401  (torch's own use of the deprecated API)

from bilevel import testing
from bilevel.testing import Problem


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_problem() -> Callable[..., Problem]:
    return testing.seeded_problem


@pytest.fixture
def reference() -> SimpleNamespace:
    return SimpleNamespace(
        adapt=testing.reference_adapt, meta_loss=testing.reference_meta_loss, meta_grad=testing.reference_meta_grad
    )


@pytest.fixture
def rel_err() -> Callable[..., float]:
    return testing.rel_err


@pytest.fixture(autouse=True)
def onednn_kernels():
    """Turn oneDNN's CPU convolutions back on after a test that ran ``cpu_conv=native``."""
    yield
    torch.backends.mkldnn.enabled = True
