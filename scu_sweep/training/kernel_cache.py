"""One process at a time builds MLX's CPU kernels for a graph it has not built before.

On CPU, ``mx.compile`` fuses element-wise ops into kernels that MLX builds with the system's
``g++`` the first time they run (~0.7 s each, ~50 for a SmolLM2 step and its evaluation) and
keeps as shared libraries under ``$TMPDIR/mlx/<version>/cpu``, where every later process finds
them. The jobs of a sweep start together, so on a machine where that cache is cold each of them
built every kernel itself: three jobs on two cores spent ~60 s in their first step. With
:func:`built_once` around a graph's first call the first process builds them while the others
wait, then they run on the built libraries; a marker per graph lets later processes skip the
wait. Only the order of work changes, never a result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx


def kernel_dir() -> Path:
    """Where MLX keeps its built CPU kernels (its own choice: the temp dir, then mlx/<version>/cpu)."""
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu"


def _marker(key: str) -> Path:
    return kernel_dir() / f".scu_sweep-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def built_once(key: str) -> Iterator[None]:
    """Run the body (a graph's first evaluation; ``key`` names the graph) holding a lock shared
    by every process on this machine, unless the graph's kernels were built before."""
    marker = _marker(key)
    if mx.default_device() != mx.cpu or marker.exists():
        yield
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        lock = open(marker.parent / ".scu_sweep.lock", "a")
    except OSError:  # no writable temp dir: MLX cannot build kernels there either
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # built by the process this one waited for
            fcntl.flock(lock, fcntl.LOCK_UN)
            yield
            return
        yield
        with contextlib.suppress(OSError):
            marker.touch()
