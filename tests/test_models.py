"""ResNet-12 and any encoder (docs/models.md): meta-gradients against independent plain-autograd
computations and finite differences in float64, the decomposition identity on every execution path,
per-set BatchNorm statistics in a user's module, and the errors for what cannot work.

The independent computation for a user's encoder runs an untouched copy of the module, with
PyTorch's own ``nn.BatchNorm`` in training mode (batch statistics), through
:func:`bilevel.testing.reference_meta_grad`: it shares nothing with the engine, not even the
BatchNorm replacement.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module

from bilevel import BilevelModel, ConfigError, ModelConfig, build_model
from bilevel.app.config.schema import register_configs
from bilevel.app.setup import setup
from bilevel.primitives.batchnorm import SetBatchNorm
from bilevel.primitives.resnet12 import ResNet12, widths
from bilevel.testing import reference_meta_grad, reference_meta_loss, rel_err, seeded_batch
import test_maml_gradients
from test_maml_gradients import assert_matches_central_differences

pytestmark = pytest.mark.usefixtures("single_thread")

THIN = dict(shape=(3, 16, 16), channels=2, ways=3, shots=1, queries=2, tasks=2)
LR = 0.4


def thin_resnet(make_problem, dtype=torch.float64, head="random"):
    return make_problem("resnet12", dtype=dtype, head=head, **THIN)


def small_conv(width: int = 3, dropout: float = 0.0) -> nn.Sequential:
    """A user's encoder: torch.nn BatchNorm2d (with running statistics), pooling, flatten."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(dropout), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
    )


class Plain(nn.Module):
    """An untouched encoder (PyTorch's BatchNorm, training mode) and a head, for the reference."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


def custom_problem(encoder: nn.Module, shape, dtype=torch.float64, ways=3, seed=0):
    """The engine's model on ``encoder`` and the reference's untouched copy of it, one batch."""
    torch.manual_seed(seed)
    untouched = copy.deepcopy(encoder).to(dtype).train()
    model = BilevelModel.from_encoder(encoder, shape, ways).to(dtype)
    params = model.init_params()
    batch = seeded_batch(torch.Generator().manual_seed(seed), ways=ways, shots=2, queries=2, tasks=2, shape=shape,
                         dtype=dtype)
    return model, Plain(untouched, copy.deepcopy(model.head)), params, batch


def maml(model, **config):
    from bilevel import build_algorithm

    return build_algorithm({"name": "maml", "inner_lr": LR, **config}, model)


# ------------------------------------------------------------------------------------------- ResNet-12
def test_resnet12_is_the_metaoptnet_architecture():
    assert widths(64) == (64, 160, 320, 640)
    net = ResNet12(3, 64)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(3, 3), (3, 3), (3, 3), (1, 1)] * 4
    assert all(m.bias is None for m in convs)
    assert sum(isinstance(m, SetBatchNorm) for m in net.modules()) == 16
    assert sum(p.numel() for p in net.parameters()) == 12_424_320
    thin = build_model(ModelConfig(name="resnet12", channels=4, pool="flatten"), (3, 84, 84), 5)
    assert thin.feature_dim == 40 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    assert build_model(ModelConfig(name="resnet12", channels=4), (3, 84, 84), 5).feature_dim == 40


@pytest.mark.parametrize("steps", [1, 2])
def test_thin_resnet12_meta_gradient_matches_plain_autograd_and_finite_differences(make_problem, monkeypatch, steps):
    p = thin_resnet(make_problem)
    reference = reference_meta_grad(p.model, p.params, p.batch, steps=steps, lr=LR, adapt="all")
    for execution in ("vmap", "loop"):
        step = p.algorithm(inner_steps=steps).with_execution(execution).meta_grad(p.params, p.batch, decompose=True)
        assert rel_err(step.grad, reference) < 1e-10, execution
        assert float(step.decomposition.identity_error) < 1e-10, execution
        assert float(step.decomposition.reconstruction_error) < 1e-10, execution
    # max-pool and leaky ReLU make the loss piecewise smooth, with kinks within 1e-6 of this point
    # along some directions (the central difference then misses by ~3e-6 of the norm at every
    # step from 1e-5 to 1e-6): a step of 1e-7 stays on one piece, and float64 round-off is ~1e-9.
    monkeypatch.setattr(test_maml_gradients, "FD_EPS", 1e-7)
    loss = lambda q: reference_meta_loss(p.model, q, p.batch, steps=steps, lr=LR, adapt="all")  # noqa: E731
    assert_matches_central_differences(reference, loss, p.params)


@pytest.mark.parametrize("head", ["random", "zero"])
def test_thin_resnet12_float32_identity(make_problem, head):
    p = thin_resnet(make_problem, dtype=torch.float32, head=head)
    for execution in ("vmap", "loop"):
        algo = p.algorithm(inner_steps=3).with_execution(execution)
        assert float(algo.meta_grad(p.params, p.batch, decompose=True).decomposition.identity_error) < 1e-5


def test_thin_resnet12_shared_path_keeps_per_task_per_set_statistics(make_problem):
    p = thin_resnet(make_problem)
    algo = p.algorithm(adapt="head", inner_steps=2)
    loop = algo.with_execution("loop").meta_grad(p.params, p.batch, decompose=True)
    shared = algo.with_execution("shared").meta_grad(p.params, p.batch, decompose=True)
    assert rel_err(shared.grad, loop.grad) < 1e-10
    for term in algo.terms:
        assert rel_err(shared.decomposition.terms[term], loop.decomposition.terms[term]) < 1e-10, term


# ------------------------------------------------------------------------------------------ any encoder
def test_any_module_is_an_encoder_without_a_layout_argument():
    """Issue: ``BilevelModel(nn.Sequential(...))`` failed with 'forward() takes 2 positional arguments'."""
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5), nn.ReLU())
    model = BilevelModel(encoder, 5, 3)
    x = torch.randn(6, 1, 4, 4)
    features = model.encode({k: v for k, v in encoder.named_parameters()}, x, layout=((2, 3),))
    halves = [model.encode({k: v for k, v in encoder.named_parameters()}, part) for part in x.split(3)]
    assert torch.allclose(features, torch.cat(halves), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps, adapt", [(1, "all"), (2, "all"), (2, "head")])
def test_custom_encoder_meta_gradient_matches_an_untouched_copy_with_torch_batchnorm(steps, adapt):
    model, untouched, params, batch = custom_problem(small_conv(), (1, 8, 8))
    reference = reference_meta_grad(untouched, params, batch, steps=steps, lr=LR, adapt=adapt)
    algo = maml(model, inner_steps=steps, adapt=adapt)
    for execution in algo.executions:
        step = algo.with_execution(execution).meta_grad(params, batch, decompose=True)
        assert rel_err(step.grad, reference) < 1e-10, execution
        assert float(step.decomposition.identity_error) < 1e-10, execution


def test_custom_encoder_shared_path_differs_without_the_layout():
    """The shared path's one batch holds every task's support and query sets: the per-set layout
    must reach the replaced BatchNorm layers, which the same forward without it visibly misses."""
    model, _, params, batch = custom_problem(small_conv(), (1, 8, 8))
    encoder = {k[len("encoder."):]: v for k, v in params.items() if k.startswith("encoder.")}
    x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    layout = ((2, batch.support_y.shape[1]), (2, batch.query_y.shape[1]))
    per_set = torch.cat([model.encode(encoder, s) for s in (*batch.support_x, *batch.query_x)])
    assert torch.allclose(model.encode(encoder, x, layout), per_set, rtol=0, atol=1e-12)
    assert not torch.allclose(model.encode(encoder, x), per_set, rtol=0, atol=1e-3)


def test_custom_encoder_float32_identity():
    model, _, params, batch = custom_problem(small_conv(width=4), (1, 12, 12), dtype=torch.float32)
    algo = maml(model, inner_steps=3)
    for execution in ("vmap", "loop"):
        step = algo.with_execution(execution).meta_grad(params, batch, decompose=True)
        assert float(step.decomposition.identity_error) < 1e-5, execution


def test_dropout_is_off_and_batchnorm_ignores_the_mode():
    with_dropout, _, params, batch = custom_problem(small_conv(dropout=0.5), (1, 8, 8))
    without, _, _, _ = custom_problem(small_conv(dropout=0.0), (1, 8, 8))
    vmap = maml(with_dropout, inner_steps=1).with_execution("vmap").meta_grad(params, batch)  # vmap refuses random ops
    assert rel_err(vmap.grad, maml(without, inner_steps=1).meta_grad(params, batch).grad) < 1e-12
    normalise = BilevelModel(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, affine=False)), 64, 3).to(torch.float64)
    x = batch.support_x[0]
    for mode in (True, False):
        features = normalise.train(mode).encode({}, x)
        assert torch.allclose(features.mean(0), torch.zeros(64, dtype=x.dtype), rtol=0, atol=1e-12), mode
        assert torch.allclose(features.var(0, unbiased=False), torch.ones(64, dtype=x.dtype), rtol=0, atol=1e-3), mode


def test_custom_model_from_the_config(tmp_path, monkeypatch):
    (tmp_path / "user_encoders.py").write_text(
        "import torch.nn as nn\n"
        "def mlp(width):\n"
        "    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelConfig(name="custom", target="user_encoders.mlp", kwargs={"width": 6}), (4,), 3)
    assert model.feature_dim == 6 and isinstance(model.encoder[1], SetBatchNorm)
    batch = seeded_batch(torch.Generator().manual_seed(0), ways=3, shots=2, queries=2, tasks=2, shape=(4,))
    model = model.to(torch.float64)
    params = model.init_params()
    step = maml(model, inner_steps=2).with_execution("vmap").meta_grad(params, batch, decompose=True)
    assert float(step.decomposition.identity_error) < 1e-10


@pytest.mark.parametrize("target, kwargs, message", [
    (None, {}, "model=custom needs model.target"),
    ("no_such_package.Encoder", {}, "no module 'no_such_package' can be imported"),
    ("torch.nn.NoSuchLayer", {}, "torch.nn has no attribute 'NoSuchLayer'"),
    ("torch.float32", {}, "not an nn.Module class or factory"),
    ("torch.zeros", {"size": (2,)}, "returned a Tensor, not a torch.nn.Module"),
    ("torch.nn.Linear", {"width": 3}, "raised TypeError"),
    ("torch.nn.Identity", 3, "model.kwargs must be a mapping"),
    ("torch.nn.Identity", {}, r"must map inputs \[n, 1, 16, 16\] to features \[n, d\], but gave \(2, 1, 16, 16\)"),
    ("torch.nn.Linear", {"in_features": 5, "out_features": 2}, "failed on a dry forward"),
])
def test_custom_model_errors_say_what_to_change(target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(name="custom", target=target, kwargs=kwargs), (1, 16, 16), 3)


def run_config(*overrides: str):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=["device=cpu", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model=resnet12", "data.image_size=12"], "at least 16x16.*data.image_size >= 16"),
    (["model=conv4", "data.image_size=8"], "at least 16x16.*data.image_size >= 16"),
    (["model=mlp", "data.image_size=100000"], r"data.image_size must be in \[1, 512\]"),
    (["model=custom", "model.target=torch.nn.Identity"], r"features \[n, d\]"),
    (["model=resnet12", "model.pool=max"], "model.pool"),
    (["model=custom", "model.target=torch.nn.Linear", "model.kwargs={in_features: 784}"], "raised TypeError"),
])
def test_impossible_models_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup(run_config(*overrides))


def test_the_encoder_keeps_the_users_parameter_objects():
    """``with_set_statistics`` replaces BatchNorm layers but keeps their weight and bias objects."""
    encoder = small_conv()
    before = [id(p) for p in encoder.parameters()]
    model = BilevelModel.from_encoder(encoder, (1, 8, 8), 3)
    assert [id(p) for p in model.encoder.parameters()] == before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
