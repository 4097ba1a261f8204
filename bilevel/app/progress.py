"""Progress bars of a run: one for training, one per evaluation (its own phase).

The training bar's rate is the average over the whole run (``smoothing=0``), and evaluations
are taken out of its clock (:meth:`tqdm.unpause` after each), so its ETA is the remaining
training time and does not jump when an evaluation runs. An evaluation shows its own bar,
counting task batches (its total is known once the first batch has been timed), and clears
it when done.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

from bilevel.app.evaluation import Progress


def training_bar(start: int, steps: int, desc: str, enabled: bool) -> tqdm:
    """The bar over outer steps, at ``start`` of ``steps``; ``update(1)`` after every step."""
    return tqdm(initial=start, total=steps, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True,
                smoothing=0)


@contextmanager
def phase_bar(desc: str, enabled: bool) -> Iterator[Progress]:
    """A transient bar for one evaluation; yields the ``progress(done, total)`` callback."""
    bar = tqdm(total=None, desc=desc, unit="batch", leave=False, disable=not enabled, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()
