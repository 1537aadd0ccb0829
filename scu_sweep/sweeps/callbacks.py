"""Hydra callbacks: one BLAS thread per parallel job, and the sweep's own report."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from ..tracking.report import job_dirs, job_row, write_sweep_report
from ..tracking.run_files import read_yaml
from ..training import core_share
from ..training.backend import THREAD_VARS
from .resume import DirLock

log = logging.getLogger(__name__)


def check_writable(directory: str, key: str) -> None:
    """Exit 2 with one line naming ``key`` when ``directory`` cannot be created or written."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        print(f"scu_sweep: error: {key}={directory}: not writable ({e.strerror}); allowed a writable "
              "directory", file=sys.stderr)
        sys.exit(2)


def _failure_of(sweep_dir: Path) -> str | None:
    """Why a finished sweep failed as a whole, or None: an Optuna study that stopped for its
    failures (``optimization_results.yaml``), or a sweep whose every job failed."""
    stopped = (read_yaml(sweep_dir / "optimization_results.yaml") or {}).get("stopped")
    if stopped:
        return str(stopped)
    states = [job_row(j)["state"] for j in job_dirs(sweep_dir)]
    if states and "ok" not in states:
        return f"all {len(states)} jobs of the sweep failed"
    return None


class SweepReport(Callback):
    _started: float = 0.0
    _lock = None
    _env_before: dict = {}

    def on_run_start(self, config, **kwargs) -> None:
        check_writable(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        """Hold the sweep dir (a restart of the same command will not pick a live sweep).

        Worker processes inherit this environment: with several jobs in flight each
        starts with one BLAS thread (two one-thread processes beat one two-thread process, DESIGN §4)."""
        check_writable(str(config.hydra.sweep.dir), "hydra.sweep.dir")
        self._started = time.perf_counter()
        try:
            self._lock = DirLock(Path(config.hydra.sweep.dir))
        except OSError:
            log.warning("%s is held by another live sweep", config.hydra.sweep.dir)
        self._env_before = {v: os.environ.get(v) for v in (*THREAD_VARS, core_share.ENV_VAR)}
        if config.hydra.launcher.get("n_jobs", 1) != 1:
            # threads the user set stay; ours follow the jobs running (core_share)
            ours = not any(v in os.environ for v in THREAD_VARS)
            for var in THREAD_VARS:
                os.environ.setdefault(var, "1")
            if ours:
                os.environ[core_share.ENV_VAR] = "1"

    def on_multirun_end(self, config, **kwargs) -> None:
        for var, value in self._env_before.items():  # as before the sweep: a next one decides anew
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        sweep_dir = Path(config.hydra.sweep.dir)
        path = write_sweep_report(sweep_dir)
        log.info("sweep report: %s", path)
        log.info("sweep finished in %.0f s (model loads included)", time.perf_counter() - self._started)
        failed = _failure_of(sweep_dir)
        if failed:
            print(f"scu_sweep: error: {failed} (see {path})", file=sys.stderr)
            sys.exit(1)
