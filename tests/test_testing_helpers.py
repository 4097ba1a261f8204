"""Bad input to the shared test helpers of :mod:`bilevel.testing` raises a clear error."""
import pytest

from bilevel.testing import NoiselessChain, seeded_problem


def test_seeded_problem_names_the_valid_options_for_an_unknown_one():
    with pytest.raises(TypeError, match=r"unknown option\(s\) shot; valid: dtype, ways, shots, "):
        seeded_problem("mlp", shot=2)


def test_seeded_problem_rejects_an_unknown_head():
    with pytest.raises(ValueError, match="head must be one of random, zero, got 'ones'"):
        seeded_problem("mlp", head="ones")


@pytest.mark.parametrize("steps, ema, message", [(0, 0.5, "steps must be >= 1"), (2, 0.0, r"ema must be in \(0, 1\]"),
                                                 (2, 1.5, r"ema must be in \(0, 1\]")])
def test_noiseless_chain_rejects_a_bad_schedule(steps, ema, message):
    with pytest.raises(ValueError, match=message):
        NoiselessChain(steps=steps, lr=0.1, gamma=1.0, ema=ema, scale=1.0)
