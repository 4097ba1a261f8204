"""Primitives: parameter dicts, the head and its trace (eq. 1), losses, conjugate gradient, pooling, models."""
