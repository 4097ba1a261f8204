"""Hydra's own refusals of a command line, said the way the framework says its own.

Before the run's function is called, Hydra composes the config and may refuse the command
line: a misspelt key (``train.stesp=3``), a value of the wrong type (``train.steps=abc``), an
unknown config-group option (``algorithm=reptil``), a malformed override. :func:`explain` turns
each into a :class:`~bilevel.errors.ConfigError` — one paragraph naming the key, what is valid
and, for a typo, the closest valid key or option — which ``bilevel-train`` prints without a
traceback, exiting 2. Anything else stays an exception with its traceback (a bug).
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from bilevel.app.catalog import GROUP as ALGORITHM_GROUP
from bilevel.app.catalog import unknown_algorithm_message
from bilevel.errors import ConfigError
from bilevel.validate import closest, unknown_key_error

TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "bool": "true or false"}


def override_words(argv: Sequence[str]) -> list[str]:
    """The overrides of a ``bilevel-train`` command line (its words that are not flags)."""
    return [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def _compose_without(overrides: Sequence[str], key: str) -> DictConfig:
    """The config of ``overrides`` without those on ``key`` (else the defaults), to list what exists."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key and "," not in o]
    GlobalHydra.instance().clear()
    for attempt in (kept, []):
        try:
            with initialize_config_module("configs", version_base="1.3"):
                return compose("train", overrides=list(attempt))
        except (HydraException, OmegaConfBaseException):
            continue
    raise RuntimeError("the default config does not compose")  # a broken install: a bug, keep the traceback


def _keys(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, DictConfig):
        for k in node:
            name = f"{prefix}{k}"
            out.append(name)
            out.extend(_keys(node._get_node(k), name + "."))
    return out


def _unknown_key(key: str, overrides: Sequence[str]) -> ConfigError:
    cfg = _compose_without(overrides, key)
    parts = key.split(".")
    parent, depth = cfg, 0
    while depth < len(parts) - 1 and isinstance(parent, DictConfig) and parts[depth] in parent:
        parent, depth = parent._get_node(parts[depth]), depth + 1
    where = ".".join(parts[:depth]) or "the top level"
    siblings = [str(k) for k in parent] if isinstance(parent, DictConfig) else []
    return unknown_key_error(key, _keys(cfg), siblings, where)


def _bad_value(override: str, cause: BaseException) -> ConfigError:
    key, _, value = override.partition("=")
    message = str(cause).splitlines()[0]
    expected = next((words for name, words in TYPE_WORDS.items() if name in message), None)
    if expected is None:
        return ConfigError(f"{key}: {message}")
    return ConfigError(f"{key.lstrip('+~')} must be {expected}, got {value!r}")


def _unknown_option(error: MissingConfigException) -> ConfigError:
    group, _, option = (error.missing_cfg_file or "").partition("/")
    if group == ALGORITHM_GROUP:
        return ConfigError(unknown_algorithm_message(option, ALGORITHM_GROUP))
    options = list(error.options or [])
    return ConfigError(f"unknown {group} {option!r} ({group}={option});{closest(option, options)} "
                       f"choose {group}=NAME from: {', '.join(options)}")


def explain(error: BaseException, overrides: Sequence[str]) -> Optional[ConfigError]:
    """The :class:`ConfigError` that says what Hydra refused, or None when ``error`` is not a
    refusal of the command line."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        return _unknown_option(error)
    if isinstance(error, OverrideParseException):
        return ConfigError(f"cannot read the command line: {str(error).splitlines()[0]}. Overrides are "
                           f"key=value (a list: key=[a,b]; a sweep with -m: key=a,b)")
    if isinstance(error, ConfigCompositionException):
        message = str(error)
        missing = re.match(r"Could not override '([^']+)'", message)
        if missing:
            return _unknown_key(missing.group(1), overrides)
        merging = re.match(r"Error merging override (\S+)", message)
        if merging and error.__cause__ is not None:
            return _bad_value(merging.group(1), error.__cause__)
        cause = f" ({str(error.__cause__).splitlines()[0]})" if error.__cause__ is not None else ""
        return ConfigError(message.splitlines()[0] + cause)
    return None

