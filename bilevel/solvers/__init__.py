"""Inner solvers built from the head primitives: SGD steps (momentum, proximal), chains, proximal solves."""
