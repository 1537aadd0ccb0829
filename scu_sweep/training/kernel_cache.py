"""One process at a time builds MLX's CPU kernels for a graph it has not built before, with a
precompiled header.

On CPU, ``mx.compile`` fuses element-wise ops into kernels that MLX builds with the system's
``g++`` the first time they run (~50 for a SmolLM2 step and its evaluation) and keeps as shared
libraries under ``$TMPDIR/mlx/<version>/cpu``, where every later process finds them. The jobs
of a sweep start together, so on a machine where that cache is cold each of them built every
kernel itself: three jobs on two cores spent ~60 s in their first step. With :func:`built_once`
around a graph's first call the first process builds them while the others wait, then they run
on the built libraries; a marker per graph lets later processes skip the wait.

Each kernel's source includes MLX's ``compiled_preamble.h``, and parsing it is most of a
build (0.6 s of 0.65 on a 2-core Xeon). Before its first build :func:`built_once` precompiles
that header (~1 s) into the kernel directory, where g++ looks first for a quoted include of a
source there, so MLX's own ``g++`` command uses it: a build then takes ~0.15 s (a cold first
SmolLM2 step: 37 s -> 10 s). g++ ignores a precompiled header built with other flags or by
another compiler and parses the header instead, and the directory is per MLX version. Only the
order and speed of work change, never a result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx
import mlx.core as mx

from ..records import atomic_replace

# MLX 0.32's JIT build: g++ -std=c++17 -O3 -Wall -fPIC -shared -I <mlx/include> src.cpp -o lib.so
JIT_FLAGS = ("-std=c++17", "-O3", "-Wall", "-fPIC")
PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"


def kernel_dir() -> Path:
    """Where MLX keeps its built CPU kernels (its own choice: the temp dir, then mlx/<version>/cpu)."""
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu"


def precompiled_header() -> Path:
    """Where g++ finds the precompiled preamble for the kernel sources MLX writes."""
    return kernel_dir() / f"{PREAMBLE}.gch"


_pch_failed = False  # this process tried and failed: it does not try again for each graph


def build_precompiled_header() -> bool:
    """Precompile MLX's kernel preamble into the kernel directory, unless it is there; True when
    it is there now. A failure (no g++, no headers, a read-only directory) only leaves the builds
    at their usual speed."""
    global _pch_failed
    if _pch_failed:
        return False
    try:
        out = precompiled_header()
        if out.exists():
            return True
        include = Path(mlx.__path__[0]) / "include"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_replace(out, lambda tmp: subprocess.run(
            ["g++", *JIT_FLAGS, "-I", str(include), "-x", "c++-header", str(include / PREAMBLE), "-o", str(tmp)],
            capture_output=True, timeout=300, check=True))
        return True
    except (OSError, subprocess.SubprocessError, AttributeError, IndexError):
        _pch_failed = True
        return False


def _marker(key: str) -> Path:
    return kernel_dir() / f".scu_sweep-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def built_once(key: str) -> Iterator[None]:
    """Run the body (a graph's first evaluation; ``key`` names the graph) holding a lock shared
    by every process on this machine, unless the graph's kernels were built before; the
    precompiled header first."""
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
        build_precompiled_header()
        yield
        with contextlib.suppress(OSError):
            marker.touch()
