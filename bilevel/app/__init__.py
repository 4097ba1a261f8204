"""The application: the Hydra trainer, its config, logging, checkpoints, evaluation, reports."""
