"""How a Hydra job names itself in TensorBoard and HPARAMS.

* A single run is named after its command line (``algorithm=fomaml,train.steps=100``), or its
  algorithm option when it has none (``maml``); the keys its command line set come first in
  HPARAMS.
* A job of a sweep (``-m``) is named after the swept keys alone (``head.policy=random,seed=1``):
  the keys given several values on the command line or in ``hydra.sweeper.params`` (an
  ``experiment=``'s sweep). They come first in HPARAMS, marked as differing, so the table opens
  on what the sweep compares, and the trial ids are short.

The HPARAMS trial id is the values alone (``random,1``): the table has the keys as columns.
``train.resume`` is never part of a name (a resumed run keeps its name).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from bilevel.app.config.cli_errors import override_words

NOT_NAMING = ("train.resume",)


@dataclass(frozen=True)
class Naming:
    """A run's ``name`` (its TensorBoard run), the keys to show first in HPARAMS (``swept``:
    marked as differing), the config-group options it chose (HPARAMS values) and its HPARAMS
    ``trial`` id (the values of the name's keys: short enough for the table's column); a sweep's
    jobs also know the ``sweep_dir`` that holds them all."""

    name: str
    swept: tuple[str, ...] = ()
    choices: tuple[tuple[str, str], ...] = ()
    trial: str = ""
    sweep_dir: str = ""

    @property
    def trial_id(self) -> str:
        return self.trial or self.name


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def sweep_keys(argv: Sequence[str], sweeper_params: dict[str, str]) -> list[str]:
    """Keys given several values: sweep overrides of the command line, then the sweeper's params."""
    parsed = OverridesParser.create().parse_overrides(override_words(argv))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    keys += [k for k, v in sweeper_params.items() if "," in str(v) or "(" in str(v)]
    return list(dict.fromkeys(keys))


def hydra_naming() -> Naming:
    """The :class:`Naming` of the current Hydra job (see the module docstring)."""
    hydra_cfg = HydraConfig.get()
    choices = {k: str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    task = [o for o in hydra_cfg.overrides.task if _key(o) not in NOT_NAMING]
    sweep_dir = ""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        swept = sweep_keys(sys.argv[1:], dict(hydra_cfg.sweeper.get("params") or {}))
        named = [o.lstrip("+~") for o in task if _key(o) in swept] or [o.lstrip("+~") for o in task]
        sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve())
    else:
        swept = [_key(o) for o in task]
        named = [o.lstrip("+~") for o in task]
    fallback = choices.get("algorithm", "run")
    name = ",".join(named) or fallback
    trial = ",".join(o.split("=", 1)[-1] for o in named) or fallback
    return Naming(name, tuple(dict.fromkeys(swept)), tuple(sorted(choices.items())), trial, sweep_dir)
