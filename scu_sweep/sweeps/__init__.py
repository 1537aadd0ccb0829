"""Sweeps: resuming runs and sweeps (and their locks), the Optuna pruning reporter, the
Hydra callbacks, the lifeline that ends a worker with its parent. Imports nothing itself."""
