"""The pure SCU core: MDL quantities, the λ controller, the saturation and unreachable
verdicts. Stdlib only (tests/test_config.py imports it with MLX, Hydra and numpy blocked)."""
