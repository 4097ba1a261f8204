"""The offline report over training runs: ``bilevel-report RUN_DIR... [--out DIR] [--markdown PATH]
[--json PATH] [--seeds PATH]``, or ``python -m bilevel.report ...`` (:func:`bilevel.report.cli.main`).

It reads what runs left on disk (:mod:`bilevel.run_files`: ``config.yaml``, ``metrics.json``, the
TensorBoard events, the cosine probe) and imports nothing of the trainer (:mod:`bilevel.app`).

* :mod:`bilevel.report.runs` — the run directories (or per-seed files) it reads and how runs
  group into settings (equal configs but for the seed);
* :mod:`bilevel.report.tables` — the table, one row per setting, as Markdown and JSON;
* :mod:`bilevel.report.stats` — :class:`Stat` (mean, sd, t-based 95 % CI over seeds), paired t
  and Wilcoxon tests, Welch, Holm;
* :mod:`bilevel.report.study`, :mod:`bilevel.report.study_claims`,
  :mod:`bilevel.report.study_decomposition` — a study's statistics after the table: declared
  comparisons judged by one rule, exploratory comparisons, test-time zeroing, the decomposition,
  the cosine probe (written as ``study.json``);
* :mod:`bilevel.report.figures`, :mod:`bilevel.report.study_figures` — learning curves with CI
  bands, term shares, feature cosines, the cosine heat maps, the forest plot;
* :mod:`bilevel.report.html` — everything as one self-contained ``report.html``;
* :mod:`bilevel.report.seed_data` — a sweep's per-seed data, small enough to commit, which the
  report reads in place of run directories;
* :mod:`bilevel.report.cli` — the command line.

Runs shorter than their ``train.decompose_every`` are named in a warning (their decomposition is
a point or two, not a curve).
"""
from bilevel.report.cli import main
from bilevel.report.runs import Group, NoRunsError, RunRecord, find_runs, group_runs, load_run
from bilevel.report.seed_data import load_seed_data, write_seed_data
from bilevel.report.stats import Paired, Stat, Unpaired, holm, paired, welch
from bilevel.report.study import study_dict, study_markdown
from bilevel.report.tables import Summary, markdown_table, summarise

__all__ = [
    "Group", "NoRunsError", "Paired", "RunRecord", "Stat", "Summary", "Unpaired", "find_runs", "group_runs", "holm",
    "load_run", "load_seed_data", "main", "markdown_table", "paired", "study_dict", "study_markdown", "summarise",
    "welch", "write_seed_data",
]
