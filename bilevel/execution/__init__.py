"""How the tasks of a meta-batch run (vmap / loop / shared), how a run's path is chosen, memory."""
