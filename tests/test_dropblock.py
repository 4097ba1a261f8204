"""ResNet-12's DropBlock (bilevel/primitives/dropblock.py, docs/models.md): masks of b×b blocks with the
expected share, the same mask for an image however it is batched, off by default and outside
``drop_masks``; with masks on, the float64 meta-gradient of a thin ResNet-12 matches plain autograd and
finite differences, the decomposition identity holds, ``memory=recompute`` equals ``store``, and the
trainer draws masks in its meta-steps but not in its evaluations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import test_maml_gradients
from bilevel import ConfigError, DropBlock, ModelConfig, build_algorithm, build_model, drop_masks, mask_key
from bilevel.app.setup import setup
from bilevel.app.train import train
from bilevel.primitives import dropblock as dropblock_module
from bilevel.primitives.dropblock import image_keys
from bilevel.primitives.params import encoder_part
from bilevel.testing import reference_meta_grad, reference_meta_loss, rel_err, seeded_problem
from test_maml_gradients import assert_matches_central_differences
from test_memory import assert_same_rows
from test_models import run_config

pytestmark = pytest.mark.usefixtures("single_thread")

DROPPING = dict(shape=(3, 32, 32), channels=2, ways=3, shots=1, queries=2, tasks=2)
"""A thin ResNet-12 whose last two blocks see 4×4 and 2×2 maps: blocks of 2 drop there."""
RATE, SIZE, KEY, LR = 0.3, 2, 12345, 0.4


def dropping_problem(rate: float = RATE, dtype=torch.float64):
    """The thin ResNet-12 with DropBlock ``rate`` (and, at rate 0, the same parameters without it)."""
    problem = seeded_problem("resnet12", dtype=dtype, **DROPPING)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet12", channels=2, dropblock_rate=rate, dropblock_size=SIZE),
                        DROPPING["shape"], DROPPING["ways"]).to(dtype)
    return problem, model


def expected_drop_share(height: int, width: int, side: int, gamma: float) -> torch.Tensor:
    """``P(position dropped) = 1 − (1 − γ)^k`` with ``k`` the seed positions whose block covers it."""
    covering = torch.zeros(height, width)
    for r in range(height - side + 1):
        for c in range(width - side + 1):
            covering[r:r + side, c:c + side] += 1
    return 1 - (1 - gamma) ** covering


@pytest.mark.parametrize("side, size", [(10, 5), (6, 3), (5, 5)])
def test_masks_are_whole_blocks_with_the_expected_share(side, size):
    drop = DropBlock(0.1, size, layer=0)
    keys = image_keys(torch.randn(4000, 1, 6, 6, generator=torch.Generator().manual_seed(0)))
    mask = drop.mask(keys, KEY, torch.Size([32, side, side]))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    gamma = 0.1 / size**2 * side**2 / (side - size + 1) ** 2
    share = 1 - mask.mean((0, 1))
    assert (share - expected_drop_share(side, side, size, gamma)).abs().max() < 6e-3
    dropped = 1 - mask  # every dropped position lies in a size×size square of dropped positions inside the map
    whole_blocks = -F.max_pool2d(-dropped, size, stride=1)  # erosion: the blocks inside the dropped set
    covered = F.max_pool2d(F.pad(whole_blocks, (size - 1,) * 4), size, stride=1)  # dilation: their union
    assert torch.equal(covered, dropped)


def test_output_is_the_input_rescaled_per_sample_on_the_kept_positions():
    drop = DropBlock(0.3, 2, layer=1)
    x = torch.rand(8, 4, 6, 6, dtype=torch.float64) + 0.5
    keys = image_keys(torch.randn(8, 1, 5, 5))
    assert torch.equal(drop(x, keys), x)  # outside drop_masks: the identity
    with drop_masks(KEY):
        ratio = drop(x, keys) / x
    for row in ratio:
        kept = row[row != 0]
        assert 0 < kept.numel() < row.numel()
        assert torch.allclose(kept, kept[0].expand_as(kept), rtol=0, atol=1e-14)
        assert abs(float(row.mean()) - 1) < 1e-14  # the mean of the multiplier is 1 per sample


def test_a_mask_depends_on_the_image_the_key_and_the_layer_not_on_the_batch():
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)).float()
    shape = torch.Size([5, 4, 4])
    first, second = DropBlock(0.3, 2, layer=0), DropBlock(0.3, 2, layer=1)
    together = first.mask(image_keys(images), KEY, shape)
    alone = torch.cat([first.mask(image_keys(images[i:i + 1]), KEY, shape) for i in range(6)])
    assert torch.equal(together, alone)
    assert torch.equal(first.mask(image_keys(images.double()), KEY, shape), together)  # float32 -> float64 is exact
    assert torch.equal(torch.func.vmap(lambda x: first.mask(image_keys(x), KEY, shape))(images.view(2, 3, 3, 8, 8)),
                       together.view(2, 3, *shape))
    for other in (first.mask(image_keys(images), KEY + 1, shape), second.mask(image_keys(images), KEY, shape)):
        assert not torch.equal(other, together)
    assert len({tuple(m.flatten().tolist()) for m in together}) == 6
    assert mask_key(0, 1) != mask_key(0, 2) and mask_key(0, 1) != mask_key(1, 1)


def test_dropblock_is_off_by_default_and_outside_drop_masks():
    problem, dropping = dropping_problem()
    _, plain = dropping_problem(rate=0.0)
    assert ModelConfig().dropblock_rate == 0.0
    encoder = encoder_part(problem.params)
    x = problem.batch.query_x[0]
    assert torch.equal(dropping.encode(encoder, x), plain.encode(encoder, x))
    with drop_masks(KEY):
        assert torch.equal(plain.encode(encoder, x), problem.model.encode(encoder, x))
        assert not torch.allclose(dropping.encode(encoder, x), plain.encode(encoder, x))


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_with_masks_matches_plain_autograd_and_finite_differences(monkeypatch, steps):
    problem, model = dropping_problem()
    params, batch = problem.params, problem.batch
    with drop_masks(KEY):
        reference = reference_meta_grad(model, params, batch, steps=steps, lr=LR, adapt="all")
        for execution in ("vmap", "loop"):
            algo = build_algorithm({"name": "maml", "inner_lr": LR, "inner_steps": steps}, model)
            step = algo.with_execution(execution).meta_grad(params, batch, decompose=True)
            assert rel_err(step.grad, reference) < 1e-10, execution
            assert float(step.decomposition.identity_error) < 1e-10, execution
            assert float(step.decomposition.reconstruction_error) < 1e-10, execution
        # piecewise smooth (max-pool, leaky ReLU): a step of 1e-7 stays on one piece (as test_models)
        monkeypatch.setattr(test_maml_gradients, "FD_EPS", 1e-7)
        loss = lambda q: reference_meta_loss(model, q, batch, steps=steps, lr=LR, adapt="all")  # noqa: E731
        assert_matches_central_differences(reference, loss, params)
    unmasked = reference_meta_grad(model, params, batch, steps=steps, lr=LR, adapt="all")
    assert rel_err(unmasked, reference) > 1e-2


@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("memory", ["recompute", "recompute:2"])
def test_recompute_equals_store_with_masks(execution, memory):
    problem, model = dropping_problem()
    algo = build_algorithm({"name": "maml", "inner_lr": LR, "inner_steps": 3}, model).with_execution(execution)
    with drop_masks(KEY):
        assert_same_rows(algo, problem.params, problem.batch, memory)


@pytest.mark.parametrize("overrides, message", [
    (["model=resnet12", "model.dropblock_rate=1.0"], r"model.dropblock_rate must be in \[0, 1\)"),
    (["model=resnet12", "model.dropblock_rate=-0.1"], r"model.dropblock_rate must be in \[0, 1\)"),
    (["model=resnet12", "model.dropblock_size=0"], "model.dropblock_size must be >= 1"),
    (["model=conv4", "model.dropblock_rate=0.1"], "applies to model=resnet12 only"),
])
def test_bad_dropblock_settings_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        setup(run_config(*overrides))


def test_the_trainer_draws_masks_in_its_steps_and_none_in_its_evaluations(tmp_path, monkeypatch):
    """Counts DropBlock's calls by (inside an evaluation, inside ``drop_masks``) over a short run."""
    import bilevel.app.attempt as attempt

    calls = {(evaluating, masked): 0 for evaluating in (False, True) for masked in (False, True)}
    evaluating = [False]
    forward, evaluate = DropBlock.forward, attempt.evaluate

    def counting_forward(self, x, keys):
        calls[evaluating[0], dropblock_module.masking()] += 1
        return forward(self, x, keys)

    def flagged_evaluate(*args, **kwargs):
        evaluating[0] = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluating[0] = False

    monkeypatch.setattr(DropBlock, "forward", counting_forward)
    monkeypatch.setattr(attempt, "evaluate", flagged_evaluate)
    cfg = run_config("model=resnet12", "model.channels=2", "model.dropblock_rate=0.2", "model.dropblock_size=2",
                     "data.queries=2", "train.steps=2", "train.meta_batch=2", "train.decompose_every=1",
                     "train.eval_every=2", "eval.tasks=2", "eval.final_tasks=2", "execution=loop")
    train(cfg, tmp_path, show_progress=False)
    assert calls[False, True] > 0 and calls[True, False] > 0 and calls[True, True] == 0, calls
