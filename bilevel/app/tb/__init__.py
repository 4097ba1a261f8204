"""TensorBoard logging of a run (the events under ``<run dir>/tb/``, :mod:`bilevel.run_files`).

* :mod:`~bilevel.app.tb.logger` — :class:`RunLogger`: scalars with descriptions, decomposition
  panels, figures, text and HPARAMS, and the events a resumed attempt carries over;
* :mod:`~bilevel.app.tb.layout` — what each panel is: descriptions and the custom-scalars layout;
* :mod:`~bilevel.app.tb.hparams` — the HPARAMS entry (swept keys first);
* :mod:`~bilevel.app.tb.figures` — the pair-weight and class-cosine figures of a decomposition.

The tag names themselves are :mod:`bilevel.tags` (the report reads them too).
"""
from bilevel.app.tb.figures import cosine_figure, pair_weight_figure
from bilevel.app.tb.hparams import HPARAM_KEYS, hparam_summaries
from bilevel.app.tb.layout import custom_scalars_layout, describe, present, term_of
from bilevel.app.tb.logger import RunLogger, run_name

__all__ = [
    "HPARAM_KEYS", "RunLogger", "cosine_figure", "custom_scalars_layout", "describe", "hparam_summaries",
    "pair_weight_figure", "present", "run_name", "term_of",
]
