"""A run's configuration and command line, checked before any work.

* :mod:`~bilevel.app.config.schema` — the typed schema (Hydra structured configs) and its
  validation: keys, types, declared ranges;
* :mod:`~bilevel.app.config.catalog` — the one list of algorithms a run can select (presets and
  installed plugins);
* :mod:`~bilevel.app.config.cli_errors` — Hydra's refusals of a command line, said as one paragraph;
* :mod:`~bilevel.app.config.preflight` — the checks that need more than the declared ranges (the
  model's shapes and size, the outer learning rate);
* :mod:`~bilevel.app.config.naming` — how a Hydra job names itself in TensorBoard and HPARAMS.
"""
from bilevel.app.config.catalog import algorithm_choices, register_plugin_presets, unknown_algorithm_message
from bilevel.app.config.cli_errors import check_overrides, explain, explain_os_error, override_words
from bilevel.app.config.naming import Naming, hydra_naming
from bilevel.app.config.preflight import check_model, check_outer_lr
from bilevel.app.config.schema import TrainConfig, register_configs, typed_config, validate

__all__ = [
    "Naming", "TrainConfig", "algorithm_choices", "check_model", "check_outer_lr", "check_overrides", "explain",
    "explain_os_error", "hydra_naming", "override_words", "register_configs", "register_plugin_presets",
    "typed_config", "unknown_algorithm_message", "validate",
]
