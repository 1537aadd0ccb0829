"""Training: the BLAS preload, data packing, the cross-entropy, the compiled step and loop,
checkpoints.

Imports nothing itself: ``scu_sweep.training.backend`` must preload BLAS before the first
``import mlx.core``, so importing this package may not import MLX."""
