"""scu_sweep's Optuna sweeper for Hydra (``hydra/sweeper=optuna``)."""
