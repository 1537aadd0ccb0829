"""Where scu_sweep keeps converted models and patched libraries."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SCU_SWEEP_CACHE``, else ``$XDG_CACHE_HOME/scu_sweep``, else ``~/.cache/scu_sweep``."""
    root = os.environ.get("SCU_SWEEP_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scu_sweep"
