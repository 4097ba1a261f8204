"""Hypergradient rules (unrolled, implicit, chain) and the typed per-task results they produce."""
