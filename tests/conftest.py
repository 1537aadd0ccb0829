"""Shared fixtures: composed configs, an isolated cache, a tiny model and corpus."""

from __future__ import annotations

from scu_sweep.training.backend import preload_blas

preload_blas()  # before anything imports mlx: in-process runs get the fast BLAS too

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Converted models and patched libraries go to a per-session cache unless one is given."""
    if "SCU_SWEEP_CACHE" not in os.environ:
        os.environ["SCU_SWEEP_CACHE"] = str(tmp_path_factory.mktemp("scu_cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    yield


def compose_cfg(overrides=()):
    """The real config from conf/, composed with Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    from scu_sweep.config import register

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def cli(args, cwd=None, env=None, timeout=600):
    """Run ``python -m scu_sweep ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "scu_sweep", *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
