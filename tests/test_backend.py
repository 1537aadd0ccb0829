"""Tests of the OpenBLAS preload; each case runs in a fresh interpreter.

The preload only works before ``import mlx.core`` and cannot be undone, so every
case is a subprocess that prints one JSON line for the test to check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: preload, then MLX, then report what happened.
PRELUDE = """
import ctypes, json, os, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from scu_sweep.training import backend
    desc = backend.preload_blas()
    again = backend.preload_blas()

def maps_openblas():
    with open("/proc/self/maps") as f:
        return any("openblas" in line for line in f)

def owner_of(symbol):
    # The library whose mapping holds the address a global lookup of symbol
    # gives, i.e. the definition libmlx.so binds to.
    addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi and len(parts) > 5:
                return parts[5]
    return None

out = {"desc": desc, "again": again,
       "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}
"""


def _cmeel_usable() -> bool:
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        return False
    try:
        from importlib.metadata import distribution

        distribution("cmeel-openblas")
    except Exception:
        return False
    return "avx512f" in Path("/proc/cpuinfo").read_text()


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the preload exists for Linux only"
)
def _scipy_openblas_usable() -> bool:
    try:
        import scipy_openblas32  # noqa: F401
    except ImportError:
        return False
    return os.uname().machine == "x86_64"


needs_cmeel = pytest.mark.skipif(
    not _cmeel_usable(), reason="needs Linux x86_64 with AVX-512 and cmeel-openblas"
)
needs_fast_blas = pytest.mark.skipif(
    not (_cmeel_usable() or _scipy_openblas_usable()), reason="needs Linux x86_64 and a fast-BLAS wheel"
)


def run_child(body: str, tmp_path: Path, setup: str = "", **env_overrides: str) -> dict:
    """Run setup + PRELUDE + body in a fresh interpreter; return its ``out`` dict."""
    env = {k: v for k, v in os.environ.items() if k != "SCU_SWEEP_BLAS"}
    env.update(SCU_SWEEP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.update(env_overrides)
    code = setup + PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_fast_blas
def test_preloaded_openblas_serves_mlx_matmul(tmp_path):
    out = run_child(
        """
        import numpy as np
        import mlx.core as mx
        mx.set_default_device(mx.cpu)
        rng = np.random.default_rng(0)
        a = rng.standard_normal((1024, 1024), dtype=np.float32)
        b = rng.standard_normal((1024, 1024), dtype=np.float32)
        got = np.array(mx.array(a) @ mx.array(b))
        ref = a.astype(np.float64) @ b.astype(np.float64)
        out["max_err"] = float(np.abs(got - ref).max())
        out["mapped"] = maps_openblas()
        out["sgemm_owner"] = owner_of("cblas_sgemm")
        out["coretype"] = os.environ.get("OPENBLAS_CORETYPE")
        """,
        tmp_path,
        OPENBLAS_CORETYPE="Haswell",
    )
    assert out["warnings"] == []
    assert "OpenBLAS" in out["desc"] and out["again"] == out["desc"]
    assert out["mapped"]
    assert "openblas" in out["sgemm_owner"]
    assert out["max_err"] < 1e-2  # entries are ~32 in size; fp32 error ~1e-4
    assert out["coretype"] == "Haswell"  # hidden from the library only while it loads


@needs_cmeel
def test_missing_libgfortran_uses_patched_cached_copy(tmp_path):
    import ctypes.util

    if ctypes.util.find_library("gfortran"):
        pytest.skip("this system has its own libgfortran; no patched copy is made")
    first = run_child("", tmp_path)
    second = run_child("", tmp_path)
    cache = tmp_path / "cache" / "blas"
    assert str(cache) in first["desc"]
    assert first["desc"] == second["desc"]
    assert [p.name for p in cache.rglob("*")].count("libopenblas.so.0") == 1
    assert not list(cache.rglob(".tmp-*"))


@needs_fast_blas
def test_concurrent_first_use_builds_cache_safely(tmp_path):
    env = dict(os.environ, SCU_SWEEP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.pop("SCU_SWEEP_BLAS", None)
    cmd = [sys.executable, "-c", PRELUDE + "print(json.dumps(out))\n"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(o["desc"] and not o["warnings"] for o in outs)


@needs_fast_blas
def test_set_blas_threads_reaches_loaded_openblas(tmp_path):
    out = run_child(
        """
        backend.set_blas_threads(1)
        out["threads"] = backend._lib.openblas_get_num_threads()
        child = {}
        backend.set_blas_threads(3, child)
        out["child"] = child
        """,
        tmp_path,
    )
    assert out["threads"] == 1
    assert out["child"] == {"OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "3"}


@pytest.mark.skipif(not _scipy_openblas_usable(), reason="needs Linux x86_64 and scipy-openblas32")
def test_scipy_openblas_copy_exports_standard_names_and_serves_mlx(tmp_path):
    body = """
        import numpy as np
        import mlx.core as mx
        a = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 100
        ref = a.astype(np.float64) @ a.T.astype(np.float64)
        out["err"] = float(np.abs(np.array(mx.array(a) @ mx.array(a.T)) - ref).max() / np.abs(ref).max())
        out["sgemm_owner"] = owner_of("cblas_sgemm")
        out["lapack_owner"] = owner_of("sgetrf_")
        """
    first = run_child(body, tmp_path, SCU_SWEEP_BLAS="scipy-openblas32")
    second = run_child(body, tmp_path, SCU_SWEEP_BLAS="scipy-openblas32")
    cache = tmp_path / "cache" / "blas"
    assert first["warnings"] == [] and "DYNAMIC_ARCH" in first["desc"] and str(cache) in first["desc"]
    # the unprefixed names resolve to the renamed copy in the cache, built once
    assert first["sgemm_owner"].startswith(str(cache)) and first["lapack_owner"] == first["sgemm_owner"]
    assert second["desc"] == first["desc"]
    assert len(list(cache.rglob("libscipy_openblas.so"))) == 1 and not list(cache.rglob(".tmp-*"))
    assert first["err"] < 1e-6  # relative to the largest entry: fp32 rounding


@pytest.mark.parametrize("value", ["off", "OFF", "0"])
def test_env_var_disables_preload(tmp_path, value):
    out = run_child(
        """
        import mlx.core as mx
        out["mapped"] = maps_openblas()
        """,
        tmp_path,
        SCU_SWEEP_BLAS=value,
    )
    assert out["desc"] is None and out["warnings"] == []
    assert not out["mapped"]


def test_missing_library_warns_once_and_mlx_still_works(tmp_path):
    out = run_child(
        """
        import mlx.core as mx
        out["sum"] = (mx.ones((64, 64)) @ mx.ones((64, 64))).sum().item()
        """,
        tmp_path,
        SCU_SWEEP_BLAS=str(tmp_path / "no" / "libopenblas.so.0"),
    )
    assert out["desc"] is None and out["again"] is None
    assert len(out["warnings"]) == 1 and "does not exist" in out["warnings"][0]
    assert out["sum"] == 64.0**3


@needs_cmeel
def test_uninstalled_cmeel_package_warns(tmp_path):
    # Simulate a machine without the wheel: its metadata lookup fails.
    setup = """
import importlib.metadata as md
_real = md.distribution
def _fake(name):
    if name == "cmeel-openblas":
        raise md.PackageNotFoundError(name)
    return _real(name)
md.distribution = _fake
"""
    out = run_child("out['mapped'] = maps_openblas()", tmp_path, setup=setup)
    assert out["desc"] is None and not out["mapped"]
    assert len(out["warnings"]) == 1 and "not installed" in out["warnings"][0]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="auto mode is x86_64 only")
@pytest.mark.parametrize("module", ["torch", "mlx.core"])
def test_refuses_after_torch_or_mlx_import(tmp_path, module):
    # A stand-in module is enough: the guard looks at sys.modules.
    setup = f"import sys, types; sys.modules[{module!r}] = types.ModuleType({module!r})\n"
    out = run_child("out['mapped'] = maps_openblas()", tmp_path, setup=setup)
    assert out["desc"] is None and not out["mapped"]
    assert len(out["warnings"]) == 1 and module in out["warnings"][0]


def test_batch_scheduling_marks_only_this_process_cpu_bound(tmp_path):
    out = run_child("""
        before = os.sched_getscheduler(0)
        out.update(before=before, set=backend.batch_scheduling(), after=os.sched_getscheduler(0),
                   parent=os.sched_getscheduler(os.getppid()))
    """, tmp_path)
    assert out["set"] is True and out["before"] == os.SCHED_OTHER
    assert out["after"] == os.SCHED_BATCH and out["parent"] == os.SCHED_OTHER


def test_batch_scheduling_is_a_no_op_without_the_class(monkeypatch):
    from scu_sweep.training import backend

    monkeypatch.delattr(os, "SCHED_BATCH")
    assert backend.batch_scheduling() is False
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
