"""A user's encoder named by its import path: ``model=custom model.target=pkg.module.Class``.

``target`` is ``package.module.Name`` where ``Name`` is an ``nn.Module`` subclass or any callable
that returns an ``nn.Module`` (a factory function); it is called with ``model.kwargs`` as keyword
arguments. What the module must do (map ``[n, ...]`` inputs to ``[n, d]`` features) is checked
by the dry forward of :func:`bilevel.primitives.models.feature_size`.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

EXAMPLE = "model.target=my_package.encoders.MyEncoder"


def _resolve(target: str) -> Any:
    """The object at import path ``target`` (the longest importable module prefix, then attributes)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise ValueError(f"model.target={target}: importing {module_name} failed: {err}") from err
            continue
        except Exception as err:
            raise ValueError(f"model.target={target}: importing {module_name} failed: "
                             f"{type(err).__name__}: {err}") from err
        for i, attribute in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attribute):
                raise ValueError(f"model.target={target}: {'.'.join(parts[:i])} has no attribute {attribute!r}")
            obj = getattr(obj, attribute)
        return obj
    raise ValueError(f"model.target={target}: no module {parts[0]!r} can be imported (is it on PYTHONPATH, "
                     f"or installed?); give the full path, e.g. {EXAMPLE}")


def import_encoder(target: Optional[str], kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """``target(**kwargs)``, checked to be an ``nn.Module`` (errors name the key to change);
    ``kwargs`` may be an OmegaConf node, passed on as plain containers."""
    if isinstance(kwargs, DictConfig):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"model.kwargs must be a mapping of keyword arguments, e.g. 'model.kwargs={{width: 32}}', "
                         f"got {kwargs!r}")
    if not target or "." not in target:
        raise ValueError(f"model=custom needs model.target, the import path of an nn.Module class or factory "
                         f"(got {target!r}), e.g. {EXAMPLE}")
    factory = _resolve(target)
    if not callable(factory):
        raise ValueError(f"model.target={target} is a {type(factory).__name__}, not an nn.Module class or factory")
    try:
        encoder = factory(**kwargs)
    except Exception as err:
        raise ValueError(f"model.target={target} with model.kwargs={kwargs} raised {type(err).__name__}: {err}") from err
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"model.target={target} returned a {type(encoder).__name__}, not a torch.nn.Module")
    return encoder
