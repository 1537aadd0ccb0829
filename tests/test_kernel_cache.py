"""kernel_cache.built_once: on a cold MLX kernel cache one process at a time runs a graph's
first call; once built, nobody waits. And the training loop's first step takes that lock."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT

CHILD = """
import json, sys, time
from scu_sweep.training.kernel_cache import built_once
t0 = time.time()
with built_once(sys.argv[1]):
    t1 = time.time()
    time.sleep(float(sys.argv[2]))
print(json.dumps({"asked": t0, "entered": t1, "left": time.time()}))
"""


def _child(key: str, seconds: float, tmpdir: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, key, str(seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _kernel_dir(tmpdir: Path) -> Path:
    import mlx.core as mx

    return tmpdir / "mlx" / mx.__version__ / "cpu"


def test_a_cold_graph_runs_in_one_process_at_a_time_then_in_all(tmp_path):
    procs = [_child("graph-a", 1.0, tmp_path) for _ in range(3)]
    runs = sorted((_result(p) for p in procs), key=lambda r: r["entered"])
    first, *rest = runs
    # the first builds alone; the others enter once it has left (or on arrival, if they came
    # later: a slow interpreter start) without a second wait
    for r in rest:
        assert r["entered"] >= first["left"]
        assert r["entered"] - max(r["asked"], first["left"]) < 0.5
    assert len(list(_kernel_dir(tmp_path).glob(".scu_sweep-*"))) == 1


def test_a_built_graph_takes_no_lock_and_an_unbuilt_one_waits(tmp_path):
    assert _result(_child("graph-b", 0.0, tmp_path))  # builds it, leaves its marker
    lock_path = _kernel_dir(tmp_path) / ".scu_sweep.lock"
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process building something
        built, unbuilt = _child("graph-b", 0.0, tmp_path), _child("graph-c", 0.0, tmp_path)
        assert _result(built, timeout=30)  # no wait
        time.sleep(1.0)
        assert unbuilt.poll() is None  # waits for the lock
        fcntl.flock(held, fcntl.LOCK_UN)
    assert _result(unbuilt, timeout=30)


@pytest.mark.slow
def test_the_first_training_step_waits_for_a_build_in_progress(tmp_path):
    """A run whose step graph is new (a σ no run used: the penalty constant is in the graph)
    does not run its first step while another process holds the kernel lock."""
    from scu_sweep.training.kernel_cache import kernel_dir

    run_dir = tmp_path / "run"
    sigma = 0.012 + uuid.uuid4().int % 10_000 * 1e-9
    lock_path = kernel_dir() / ".scu_sweep.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        p = subprocess.Popen([sys.executable, "-m", "scu_sweep", "model=tiny", "logger=none", "train.steps=3",
                              f"prior.sigma={sigma!r}", f"hydra.run.dir={run_dir}"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        end = time.monotonic() + 120
        log = run_dir / "__main__.log"
        while not log.exists() or "trainable params" not in log.read_text():
            assert p.poll() is None and time.monotonic() < end, "the run never got to training"
            time.sleep(0.2)
        time.sleep(4.0)  # a tiny step takes ~0.1 s: unblocked, it would be done by now
        metrics = run_dir / "metrics.jsonl"
        assert p.poll() is None and not (metrics.exists() and metrics.read_text().strip())
        fcntl.flock(held, fcntl.LOCK_UN)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


PCH_CHILD = """
import sys
import mlx.core as mx
from scu_sweep.training.kernel_cache import built_once, precompiled_header
x = mx.arange(8, dtype=mx.float32)
with built_once(sys.argv[1]):
    y = mx.compile(lambda v: mx.exp(v * 0.25 - 1.0) * v)(x)
    mx.eval(y)
print(precompiled_header().exists(), mx.allclose(y, mx.exp(x * 0.25 - 1.0) * x).item())
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="MLX builds CPU kernels with g++")
def test_mlx_builds_a_new_kernel_with_the_precompiled_preamble(tmp_path):
    """g++ -H prints '! <file>.gch' for a precompiled header it uses: a g++ first on PATH adds -H
    and logs that, so the test sees whether MLX's own build command found the header."""
    log, bin_dir = tmp_path / "gxx.log", tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} -H "$@" 2>>{log}\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-c", PCH_CHILD, uuid.uuid4().hex], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
    used = [line for line in log.read_text().splitlines() if line.startswith("! ")]
    assert used and all(line.endswith("compiled_preamble.h.gch") for line in used), log.read_text()[-2000:]
