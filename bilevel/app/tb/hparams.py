"""The HPARAMS entry of a run: its hyperparameters, swept keys first, and the metrics that matter.

TensorBoard's HPARAMS table shows the hyperparameters of the experiment summary sorted with
those marked ``differs`` first, then by name, and ticks the first five; PyTorch's
``add_hparams`` marks none, so the table opened on the first keys of the whole config in
alphabetical order. Here a job of a sweep logs only the swept keys (:mod:`bilevel.app.config.naming`):
the keys that vary across the sweep's runs, all marked ``differs`` (a key equal in every run
tells the runs nothing; the whole config is in each run's ``config.yaml``). A single run logs
the keys its command line set, marked ``differs`` so that they come first, then the few keys that
say what it is (:data:`HPARAM_KEYS`). The metrics are the final accuracies; the session's group
— the HPARAMS "trial id" — is short: the swept values.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import time

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

HParam = bool | float | int | str
HPARAM_KEYS = (
    "algorithm", "algorithm.order", "algorithm.adapt", "algorithm.inner_steps", "algorithm.test_steps",
    "head.policy", "ablation", "data", "data.shots", "train.steps", "seed",
)
"""The keys every HPARAMS entry holds besides the swept ones (``algorithm``, ``ablation``,
``data``: the config-group options)."""


def hparam_value(value: Any) -> HParam:
    """A config value as an HPARAMS value: numbers, booleans and strings stay, ``None`` is
    ``"null"``, anything else (lists) its string."""
    if value is None:
        return "null"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _data_type(value: HParam) -> int:
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    if isinstance(value, (int, float)):
        return api_pb2.DATA_TYPE_FLOAT64
    return api_pb2.DATA_TYPE_STRING


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                        tensor=metadata.NULL_TENSOR)])


def hparam_summaries(values: Mapping[str, Any], swept: Sequence[str], metric_tags: Sequence[str],
                     group: str, sweep: bool = False) -> list[Summary]:
    """Experiment, session-start and session-end summaries of ``values`` (flattened config and
    group options) restricted to the ``swept`` keys, first and marked as differing, and — unless
    the run is a job of a ``sweep`` — :data:`HPARAM_KEYS`; ``metric_tags`` are scalar tags of the
    run; ``group`` names the session."""
    keys = [*swept] if sweep else [*swept, *HPARAM_KEYS]
    shown = {k: hparam_value(values[k]) for k in keys if k in values}
    order = [k for k in swept if k in shown] + sorted(k for k in shown if k not in swept)
    now = time.time()
    experiment = api_pb2.Experiment(
        time_created_secs=now,
        hparam_infos=[api_pb2.HParamInfo(name=k, type=_data_type(shown[k]), differs=k in swept) for k in order],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t), display_name=t) for t in metric_tags],
    )
    start = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=now)
    for key in order:
        value = shown[key]
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = value
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=now)
    return [
        _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ]
