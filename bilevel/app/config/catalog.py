"""The one list of algorithms a run can select: ``algorithm=NAME``.

It is the union of the preset config files of ``configs/algorithm/`` (``maml``, ``fomaml``,
``anil``, ``imaml``, ``entropy_sgd``: a plugin with chosen options) and every registered
plugin, built in or installed through the ``bilevel.algorithms`` entry points. A plugin without
a preset file of its own gets one made from its Config's defaults (:func:`register_plugin_presets`),
so ``algorithm=reptile`` works as soon as the Reptile plugin is installed, and Hydra's own
list of options is this list too.
"""
from __future__ import annotations

from importlib.resources import files

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from bilevel.algorithm import ENTRY_POINT_GROUP, available_algorithms, get_algorithm
from bilevel.validate import closest

GROUP = "algorithm"


def preset_names() -> list[str]:
    """The preset files of ``configs/algorithm/`` (without ``.yaml``), sorted."""
    return sorted(p.name[: -len(".yaml")] for p in (files("configs") / GROUP).iterdir() if p.name.endswith(".yaml"))


def algorithm_choices() -> list[str]:
    """Every ``algorithm=NAME`` a run can select: presets and registered plugins, sorted."""
    return sorted(set(preset_names()) | set(available_algorithms()))


def register_plugin_presets() -> None:
    """Store ``algorithm/<name>`` in Hydra's ConfigStore for each plugin without a preset file:
    its Config's defaults (idempotent)."""
    presets = set(preset_names())
    for name in available_algorithms():
        if name not in presets:
            node = OmegaConf.to_container(OmegaConf.structured(get_algorithm(name).Config))
            ConfigStore.instance().store(group=GROUP, name=name, node={**node, "name": name})


def unknown_algorithm_message(name: str, key: str) -> str:
    """The message for an algorithm ``name`` given as ``key`` (``algorithm`` or ``algorithm.name``)
    that is neither a preset nor a plugin (or a preset given as a plugin name)."""
    choices = algorithm_choices()
    if key == "algorithm.name" and name in preset_names():
        return (f"algorithm.name={name} names a preset, not a plugin: select it with algorithm={name} "
                f"(the presets set algorithm.name and their options)")
    return (f"unknown algorithm {name!r} ({key}={name});{closest(name, choices)} choose algorithm=NAME from: "
            f"{', '.join(choices)} (presets and installed plugins; external plugins register through the "
            f"{ENTRY_POINT_GROUP!r} entry-point group)")
