"""The engine tier of the API: the rows, pullbacks and solver internals the bases are built from.

``bilevel`` exports what users and plugin authors need; this module exports what one needs to
write a new hypergradient rule, or to test the engine: the node-pullback rows
(:mod:`bilevel.hypergrad.rows`), the terms' node cotangents, the implicit rule's pieces, the
chain's run and decomposition, the recompute sweep, the encoder pullbacks, the inner loop's
gradient and move, conjugate gradient. Plugins never import it (``tests/test_plugin_files.py``).
"""
from bilevel.decomposition.cotangents import Nodes, stack_nodes, sum_nodes, term_cotangents
from bilevel.execution.mapping import map_meta_steps
from bilevel.hypergrad.chain import decompose_chain, finetune_accuracies
from bilevel.hypergrad.implicit import (
    ImplicitProblem,
    implicit_task,
    implicit_vjp,
    linearize_stationarity,
    solve_error,
    stationarity_residual,
)
from bilevel.hypergrad.recompute import Steps, autograd_vjp, recompute_vjp
from bilevel.hypergrad.rows import Forward, ablated_row, node_rows, plain_row, term_rows
from bilevel.primitives.cg import CGResult, cg_polynomial, conjugate_gradient
from bilevel.solvers.chain import ChainResult, ChainStep, run_chain
from bilevel.solvers.pullback import autograd_pullbacks, encoder_pullback
from bilevel.solvers.steps import move, support_gradient

__all__ = [
    "Nodes", "stack_nodes", "sum_nodes", "term_cotangents", "map_meta_steps", "decompose_chain", "finetune_accuracies",
    "ImplicitProblem", "implicit_task", "implicit_vjp", "linearize_stationarity", "solve_error",
    "stationarity_residual",
    "Steps", "autograd_vjp", "recompute_vjp", "Forward", "ablated_row", "node_rows", "plain_row", "term_rows",
    "CGResult", "cg_polynomial", "conjugate_gradient", "ChainResult", "ChainStep", "run_chain",
    "autograd_pullbacks", "encoder_pullback", "move", "support_gradient",
]
