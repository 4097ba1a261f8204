"""Declarative checks of config values, for the engine's schema and for plugins.

A config dataclass declares its checks in a class variable, keyed by field name (or by a
dotted path into a nested node it contains)::

    @dataclass
    class MyConfig(AlgorithmConfig):
        checks: ClassVar[dict[str, Check]] = {**INNER_LOOP, "noise": NON_NEGATIVE}
        noise: float = 0.0

:func:`check_declared` applies the checks of a config's type and of its bases (a subclass's
entry for a key replaces its base's) and recurses into nested dataclass nodes.
:func:`reject_unknown_keys` compares a composed config with its schema. Both raise
:class:`~bilevel.errors.ConfigError` whose message names the full key and the valid values,
and neither touches anything but the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf

from bilevel.errors import ConfigError


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``None`` bounds are open-ended, ``*_open`` excludes the bound."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: Any) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        """The interval in words; every range admits finite numbers only (NaN and ±inf never pass)."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "a finite number"


@dataclass(frozen=True)
class OneOf:
    """A value from a fixed set of choices."""

    choices: Sequence[Any]

    def admits(self, value: Any) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)


Check = Union[Range, OneOf]

AT_LEAST_1 = Range(low=1)
NON_NEGATIVE = Range(low=0)
POSITIVE = Range(low=0, low_open=True)
INNER_LOOP: dict[str, Check] = {"inner_steps": AT_LEAST_1, "inner_lr": POSITIVE}
"""The checks of the ``inner_steps``/``inner_lr`` pair most algorithms have."""


SHOWN_CHARACTERS = 80
"""The longest value a message repeats in full; a longer one is cut and its length said."""


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARACTERS` with its length when longer (a message
    stays one readable paragraph however long the value on the command line was)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


def check_value(key: str, value: Any, check: Check) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``check`` admits ``value`` (None passes:
    an optional key that is not set). A :class:`Range` refuses NaN and ±inf."""
    if value is not None and not check.admits(value):
        what = f"{check} (a finite number)" if isinstance(check, Range) and not math.isfinite(value) else str(check)
        raise ConfigError(f"{key} must be {what}, got {shown(value)}")


def declared_checks(cls: type) -> dict[str, Check]:
    """The ``checks`` class variables of ``cls`` and its bases, a subclass's entries winning."""
    merged: dict[str, Check] = {}
    for base in reversed(cls.__mro__):
        merged.update(base.__dict__.get("checks", {}))
    return merged


def _dataclass_type(node: Any) -> Optional[type]:
    cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else type(node)
    return cls if cls is not None and dataclasses.is_dataclass(cls) else None


def check_declared(config: Any, prefix: str = "") -> None:
    """Apply the declared checks of ``config`` (a dataclass instance or a structured
    DictConfig) and of every nested dataclass node, naming keys as ``prefix + path``."""
    cls = _dataclass_type(config)
    if cls is None:
        return
    for key, check in declared_checks(cls).items():
        check_value(prefix + key, functools.reduce(getattr, key.split("."), config), check)
    for f in dataclasses.fields(cls):
        check_declared(getattr(config, f.name), f"{prefix}{f.name}.")


def closest(word: str, choices: Sequence[str]) -> str:
    """`` did you mean X?`` for the closest of ``choices`` to a misspelt ``word`` ('' if none is close)."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" did you mean {match[0]}?" if match else ""


def unknown_key_error(key: str, candidates: Sequence[str], siblings: Sequence[str], where: str) -> ConfigError:
    """``unknown config key train.stesp: did you mean train.steps? valid keys of train: ...``:
    the closest of ``candidates`` (full dotted keys) and the valid keys ``siblings`` of ``where``."""
    return ConfigError(
        f"unknown config key {key}:{closest(key, candidates)} valid keys of {where}: {', '.join(siblings)}"
    )


def reject_unknown_keys(config: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Every key of ``config`` must exist in ``schema`` (recursing where the schema node is a
    dataclass); nodes typed ``Any`` in the schema (e.g. ``algorithm``) are left to their owner."""
    for key in config:
        if key not in schema:
            valid = [str(k) for k in schema]
            raise unknown_key_error(f"{prefix}{key}", [prefix + v for v in valid], valid,
                                    prefix.rstrip(".") or "the top level")
        child, child_schema = config[key], schema[key]
        if isinstance(child, DictConfig) and _dataclass_type(child_schema) is not None:
            reject_unknown_keys(child, child_schema, f"{prefix}{key}.")


def parse_memory(memory: str) -> Optional[int]:
    """The segment length ``K`` of ``recompute[:K]`` (1 for ``recompute``), None for ``store``;
    a :class:`ValueError` saying what is valid otherwise."""
    kind, _, k = str(memory).partition(":")
    if kind == "store" and not k:
        return None
    if kind == "recompute" and (not k or (k.isdigit() and int(k) >= 1)):
        return int(k) if k else 1
    raise ValueError(f"memory must be store, recompute or recompute:K with an integer K >= 1 (steps per "
                     f"recomputed segment), got {memory!r}")
