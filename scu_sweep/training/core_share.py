"""BLAS threads for the jobs still running: the cores of a sweep's finished jobs go to the jobs left.

A multirun gives each job in flight one BLAS thread (``sweeps.callbacks``). When jobs end and
no new ones start (the last jobs of a batch, an Optuna study's last trials), their cores would
sit idle: the main job's 2 % run spends its last ~23 steps alone. The ``workers`` launcher
writes how many of its jobs are running to a small file whenever that changes (:func:`publish`);
before each step a job reads it (:func:`follow`) and uses ``max(1, cores // running)`` threads.
OpenBLAS splits a matmul's output among its threads and sums each output element in the same
order, so a step gives the same result, bit for bit, with one thread or two
(``tests/test_core_share.py``): only the speed changes.

Imports only the standard library, ``records`` and ``training.backend`` (no MLX).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..records import atomic_write_text
from . import backend

log = logging.getLogger(__name__)

ENV_VAR = "SCU_SWEEP_SHARE_CORES"  # set by sweeps.callbacks when it chose one thread per job

_spec: Optional[tuple] = None  # (the running-jobs file, cores) in a worker
_threads = 0  # BLAS threads this process last set (0: none yet)


def create(cores: int) -> Optional[tuple]:
    """A new running-jobs file (0 running) for a launcher with ``cores`` cores; its spec, or
    None where no temp file can be made (the jobs then keep one thread each)."""
    try:
        fd, path = tempfile.mkstemp(prefix="scu_sweep-running-", suffix=".txt")
    except OSError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write("0")
    return path, cores


def publish(spec: tuple, running: int) -> None:
    """Say that ``running`` jobs run now (atomically: a reader never sees a half-written file)."""
    with contextlib.suppress(OSError):
        atomic_write_text(Path(spec[0]), str(running))


def use(spec: Optional[tuple]) -> None:
    """In a worker: make :func:`follow` read ``spec`` (None: keep the threads as they are)."""
    global _spec, _threads
    _spec, _threads = spec, 0


def threads_for(cores: int, running: int) -> int:
    """BLAS threads for each of ``running`` one-process jobs on ``cores`` cores."""
    return max(1, cores // max(running, 1))


def follow() -> int:
    """Set this process's BLAS threads from the running-jobs file; return them (0: not in a
    launcher that shares its cores, or the file is gone: the threads stay as they are)."""
    global _threads
    if _spec is None:
        return 0
    try:
        running = int(Path(_spec[0]).read_text())
    except (OSError, ValueError):
        return _threads
    n = threads_for(_spec[1], running)
    if n != _threads:
        backend.set_blas_threads(n)
        if _threads:
            log.info("%d of the sweep's jobs running on %d cores: %d BLAS thread%s", running, _spec[1], n,
                     "s" if n > 1 else "")
        _threads = n
    return n


def remove(spec: tuple) -> None:
    """Delete the running-jobs file (the launcher, when its pool goes)."""
    with contextlib.suppress(OSError):
        Path(spec[0]).unlink()
