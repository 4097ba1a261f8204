"""Checks of a run's set-up that need more than the config's declared ranges, made before any work.

* :func:`check_model` builds the model on the ``meta`` device (shapes only, no memory): inputs too
  small for the encoder (``data.image_size=4`` for conv4) and parameters that cannot fit in the
  device's memory (``model.hidden=100000000``) are a :class:`~bilevel.errors.ConfigError` naming
  the key, instead of an allocation failure or a convolution error.
* :func:`check_outer_lr` refuses a ``train.lr`` that the algorithm's outer optimiser does not
  use (Entropy-SGD steps with ``algorithm.outer_lr``), unless it is left at its default.
"""
from __future__ import annotations

from typing import Any

import torch

from bilevel.algorithm import BilevelAlgorithm
from bilevel.app.config.schema import TrainLoopConfig
from bilevel.errors import ConfigError
from bilevel.execution.memory import available_bytes
from bilevel.primitives.models import build_model
from bilevel.primitives.params import Params


def check_model(cfg: Any, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a model that cannot take inputs of ``shape`` or whose parameters alone exceed the
    memory available on ``device`` (module docstring)."""
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, shape, cfg.data.ways)
    except ValueError as err:  # the model's own refusal names the key to change
        raise ConfigError(str(err)) from None
    except RuntimeError as err:
        raise ConfigError(
            f"model={cfg.model.name} cannot take inputs of shape {tuple(shape)} (data.image_size="
            f"{cfg.data.image_size}): {str(err).splitlines()[0]}. Use a larger data.image_size, or model=mlp"
        ) from None
    count = sum(p.numel() for p in model.parameters())
    size = count * torch.empty((), dtype=dtype).element_size()
    available = available_bytes(device)
    if available is not None and size > available:
        raise ConfigError(
            f"model={cfg.model.name} has {count:,} parameters ({size / 1e9:.3g} GB in {cfg.dtype}), more than the "
            f"{available / 1e9:.3g} GB available on {device.type}: lower model.hidden, model.layers or model.channels"
        )


def check_outer_lr(cfg: Any, algorithm: BilevelAlgorithm, params: Params) -> None:
    """Refuse a ``train.lr`` other than its default when the algorithm's outer optimiser steps
    with a learning rate of its own (the run would silently ignore it)."""
    lr = cfg.train.lr
    optimizer = algorithm.make_outer_optimizer(list(params.values()), lr)
    used = {group.get("lr") for group in optimizer.param_groups}
    if lr != TrainLoopConfig.lr and used != {lr}:
        raise ConfigError(
            f"algorithm {algorithm.name} does not use train.lr={lr}: its outer optimiser steps with its own learning "
            f"rate ({', '.join(f'{u:g}' for u in sorted(used))}; see its options, e.g. algorithm.outer_lr). Set "
            f"that instead and leave train.lr at its default ({TrainLoopConfig.lr:g})"
        )
