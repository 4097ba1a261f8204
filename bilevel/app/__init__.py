"""The application: the Hydra trainer ``bilevel-train`` (``python -m bilevel.app.train``).

* :mod:`bilevel.app.train` — the training loop of an attempt and the entry point;
  :mod:`bilevel.app.setup` builds and checks a run before any work, :mod:`bilevel.app.start`
  starts an attempt, :mod:`bilevel.app.attempt` steps it, :mod:`bilevel.app.exits` ends the CLI
  on an error;
* what a step and its evaluations use: :mod:`bilevel.app.evaluation`, :mod:`bilevel.app.summary`,
  :mod:`bilevel.app.execution_choice`, :mod:`bilevel.app.head_policy`,
  :mod:`bilevel.app.cosine_protocol`, :mod:`bilevel.app.finite`, :mod:`bilevel.app.loss_scale`,
  :mod:`bilevel.app.stalls`, :mod:`bilevel.app.progress`;
* :mod:`bilevel.app.config` — the configuration and the command line;
* :mod:`bilevel.app.lifecycle` — run directories, checkpoints, resume, provenance, signals, the log;
* :mod:`bilevel.app.tb` — TensorBoard;
* :mod:`bilevel.app.distributed` — runs over many processes.

The offline report is :mod:`bilevel.report`. This module imports nothing, so that importing one
part of the app (``bilevel.ci95``: :mod:`bilevel.app.evaluation`) does not load Hydra.
"""
