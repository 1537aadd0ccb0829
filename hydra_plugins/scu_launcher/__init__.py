"""scu_sweep's multirun launcher for Hydra (``hydra/launcher=scu_workers``)."""
