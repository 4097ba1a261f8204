"""Inner solvers built from the head primitives: the inner-loop contract (support.py), small steps
chained into update rules (steps.py: SGD, momentum, proximal pull, learned rates), SGD steps,
SGD/Langevin chains, proximal solves."""
