"""Hydra's own refusals of a command line, said the way the framework says its own.

Before the run's function is called, Hydra composes the config and may refuse the command
line: a misspelt key (``train.stesp=3``), a value of the wrong type (``train.steps=abc``), an
unknown config-group option (``algorithm=reptil``), a malformed override. :func:`explain` turns
each into a :class:`~bilevel.errors.ConfigError` — one paragraph naming the key, what is valid
and, for a typo, the closest valid key or option — which ``bilevel-train`` prints without a
traceback, exiting 2. Anything else stays an exception with its traceback (a bug).

Some command lines Hydra accepts but a run must not: :func:`check_overrides` refuses them before
Hydra sees them (an override without a key, ``=3``; a deleted key of the run, ``~train``, which
would run on the schema's defaults unnoticed — Hydra's own ``~hydra...`` are left to it; an
empty ``hydra.run.dir=``, which would write the run into the working directory; a file or
directory name longer than the file system allows). An
:class:`OSError` raised while Hydra prepares the run (its run directory cannot be made, a name
is too long) is said by :func:`explain_os_error`.
"""
from __future__ import annotations

import dataclasses
import errno
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from bilevel.algorithm import available_algorithms, get_algorithm
from bilevel.app.config.catalog import GROUP as ALGORITHM_GROUP
from bilevel.app.config.catalog import unknown_algorithm_message
from bilevel.errors import ConfigError
from bilevel.validate import closest, shown, unknown_key_error

RUN_DIR_KEY = "hydra.run.dir"
NAME_MAX = 255
"""The longest file or directory name (one path component, in bytes) Linux file systems take."""

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


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse (:class:`ConfigError`) the overrides Hydra would accept but a run must not (module
    docstring), before Hydra composes anything."""
    for word in overrides:
        key, equals, value = word.partition("=")
        if equals and not key.lstrip("+~"):
            raise ConfigError(f"cannot read the command line: {shown(word)} has no key before '='. Overrides "
                              f"are key=value, e.g. train.steps=3")
        if key.startswith("~") and not key[1:].startswith("hydra"):
            raise ConfigError(f"{shown(word)} deletes {key[1:]!r} from the config: a run needs every key of its "
                              f"schema and would silently fall back on the schema's defaults. Set the values "
                              f"instead ({key[1:]}.KEY=VALUE), or pick another config group option")
        if key.lstrip("+") == RUN_DIR_KEY:
            _check_run_dir(value)


def _check_run_dir(value: str) -> None:
    """``hydra.run.dir=value``: not empty, and no name in it longer than the file system allows."""
    if not value.strip():
        raise ConfigError(f"{RUN_DIR_KEY} is empty: the run would write its checkpoint, config and metrics into "
                          f"the working directory. Set {RUN_DIR_KEY}=DIR (a new or an earlier run's directory), "
                          f"or leave it out for outputs/<date>/<time>")
    long = [part for part in Path(value).parts if len(part.encode()) > NAME_MAX]
    if long:
        raise ConfigError(f"{RUN_DIR_KEY} holds a name of {len(long[0].encode())} bytes ({shown(long[0])}); file "
                          f"systems take at most {NAME_MAX} per file or directory name: choose a shorter "
                          f"{RUN_DIR_KEY}")


def explain_os_error(error: OSError) -> ConfigError:
    """What an :class:`OSError` raised while Hydra prepares a run (before the run's own code)
    means: a name too long, or a run directory that cannot be made (a file is in its place or on
    its path, no permission, a read-only or virtual file system)."""
    where = shown(str(error.filename)) if error.filename is not None else "a path of the run"
    reason = error.strerror or str(error)
    if error.errno == errno.ENAMETOOLONG:
        return ConfigError(f"a name on the command line is longer than the file system allows (at most {NAME_MAX} "
                           f"bytes per file or directory name): {where}. Shorten the value that made it "
                           f"({RUN_DIR_KEY}, hydra.job.name or a config group option)")
    return ConfigError(f"cannot make the run directory {where}: {reason}. Set {RUN_DIR_KEY}=DIR to a directory "
                       f"this user can create and write (not a file, not inside a read-only or system folder)")


def _preset_lacks(cfg: DictConfig, key: str) -> Optional[str]:
    """When ``key`` is ``algorithm.FIELD``, a field of the selected plugin's Config that its preset
    does not list: the plugin's name, else None."""
    group, _, field = key.partition(".")
    node = cfg.get(ALGORITHM_GROUP)
    name = node.get("name") if isinstance(node, DictConfig) else None
    if group != ALGORITHM_GROUP or "." in field or name not in available_algorithms():
        return None
    return str(name) if field in {f.name for f in dataclasses.fields(get_algorithm(str(name)).Config)} else None


def _unknown_key(key: str, overrides: Sequence[str]) -> ConfigError:
    cfg = _compose_without(overrides, key)
    plugin = _preset_lacks(cfg, key)
    if plugin is not None:
        value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == key), "VALUE")
        return ConfigError(f"{key} is a key of algorithm {plugin}, but the selected preset does not list it, so it "
                           f"must be added: +{key}={value}")
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
    return ConfigError(f"{key.lstrip('+~')} must be {expected}, got {shown(value)}")


def _unknown_option(error: MissingConfigException) -> ConfigError:
    group, _, option = (error.missing_cfg_file or "").partition("/")
    if group == ALGORITHM_GROUP:
        return ConfigError(unknown_algorithm_message(option, ALGORITHM_GROUP))
    options = list(error.options or [])
    named = f"{option!r} ({group}={option})" if shown(option) == repr(option) else shown(option)
    return ConfigError(f"unknown {group} {named};{closest(option, options)} "
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

