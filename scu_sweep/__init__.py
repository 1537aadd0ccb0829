"""scu_sweep: Hydra sweeps of Shannon Control Unit (SCU) LoRA training in MLX."""

__version__ = "0.1.0"
