"""The public Launcher class; the work happens in ``_core`` (imported on first launch)."""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn
# the module, not the class: Hydra registers every plugin class found in this namespace
from hydra_plugins.hydra_joblib_launcher import joblib_launcher

from .config import ScuWorkersLauncherConf  # noqa: F401  (registers the config)


class ScuWorkersLauncher(joblib_launcher.JoblibLauncher):
    """hydra-joblib-launcher's jobs (its ``execute_job`` in spawned loky workers), but one
    single-worker pool per slot: a worker that dies (OOM killer, segfault) fails only its
    own job, which gets ``failure.json`` with ``stop_reason: killed``; the sweep goes on."""

    def __init__(self, n_jobs: int = -1) -> None:
        if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs!r}: allowed an int >= 1, or -1 for "
                             "one per core (-2: all cores but one, ...)")
        super().__init__(n_jobs=n_jobs)  # self.joblib = {"n_jobs": ...}, as the sweepers expect
        self.lock = threading.Lock()
        self.pool: Optional[Any] = None  # _core.Pool, made by the first launch

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _core  # lazy: loky loads on the first launch, not whenever Hydra scans plugins

        return _core.launch(self, job_overrides, initial_job_idx)
