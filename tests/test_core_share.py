"""core_share: a sweep's jobs left take the BLAS threads of its finished jobs, and a step's
result does not depend on how many threads computed it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
from joblib.externals.loky import cpu_count

from scu_sweep.records import read_jsonl
from scu_sweep.training import core_share

from conftest import ROOT
from test_backend import needs_fast_blas, run_child


@pytest.mark.parametrize("cores, running, threads", [(2, 3, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2), (8, 3, 2), (2, 0, 2)])
def test_threads_split_the_cores_among_the_jobs_running(cores, running, threads):
    assert core_share.threads_for(cores, running) == threads


@needs_fast_blas
def test_follow_sets_openblas_threads_from_the_launchers_count(tmp_path):
    out = run_child(
        """
        from scu_sweep.training import core_share
        get = backend._lib.openblas_get_num_threads
        out["unshared"] = core_share.follow()
        spec = core_share.create(2)
        core_share.use(spec)
        seen = []
        for running in (3, 2, 1, 2):
            core_share.publish(spec, running)
            seen.append([core_share.follow(), get()])
        core_share.remove(spec)
        seen.append([core_share.follow(), get()])  # the file is gone: threads stay
        out["seen"] = seen
        """,
        tmp_path,
    )
    assert out["unshared"] == 0
    assert out["seen"] == [[1, 1], [1, 1], [2, 2], [1, 1], [1, 1]]


@needs_fast_blas
def test_a_smollm2_sized_matmul_is_bitwise_the_same_with_one_two_or_four_threads(tmp_path):
    """OpenBLAS splits the output among threads, never a sum: the projections and the output
    head of a SmolLM2 step (batch 4 x 128 tokens), forward and input-gradient shapes."""
    out = run_child(
        """
        import numpy as np
        import mlx.core as mx
        mx.set_default_device(mx.cpu)
        rng = np.random.default_rng(1)
        shapes = [(512, 576, 1536), (512, 1536, 576), (512, 576, 576), (512, 576, 49152), (512, 49152, 576)]
        pairs = [(mx.array(rng.standard_normal((m, k), dtype=np.float32)),
                  mx.array(rng.standard_normal((k, n), dtype=np.float32))) for m, k, n in shapes]
        results = {}
        for threads in (1, 2, 4):
            backend.set_blas_threads(threads)
            out[f"threads_{threads}"] = backend._lib.openblas_get_num_threads()
            results[threads] = [np.array(a @ b) for a, b in pairs]
        out["same"] = [[bool(np.array_equal(x, y)) for x, y in zip(results[1], results[t])] for t in (2, 4)]
        out["nonzero"] = [float(np.abs(x).mean()) > 0 for x in results[1]]
        """,
        tmp_path,
    )
    assert [out["threads_1"], out["threads_2"], out["threads_4"]] == [1, 2, 4]
    assert all(out["nonzero"]) and out["same"] == [[True] * 5] * 2


FAST = ["model=tiny", "logger=none", "train.eval_every=10", "train.val_batches=2", "saturation.enabled=false"]


def _sweep(args, **env) -> subprocess.CompletedProcess:
    """``python -m scu_sweep ARGS`` with no BLAS thread setting of the caller's, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-m", "scu_sweep", *args], cwd=ROOT, env={**full, **env},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(cpu_count() < 2, reason="needs two cores to share")
def test_the_last_job_of_a_multirun_takes_the_finished_jobs_core(tmp_path):
    sweep = tmp_path / "sweep"
    # job 1 must still be training when the launcher hands it the core, ~2.5 s after job 0 ends
    proc = _sweep(["-m", *FAST, "train.steps=2,600", "train.eval_every=100", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (sweep / "1" / "__main__.log").read_text()
    assert f"1 of the sweep's jobs running on {cpu_count()} cores: {cpu_count()} BLAS threads" in log
    assert "BLAS thread" not in (sweep / "0" / "__main__.log").read_text()
    # the same job alone, with all the cores from its first step: the same numbers
    single = tmp_path / "single"
    proc = _sweep([*FAST, "train.steps=600", "train.eval_every=100", f"hydra.run.dir={single}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    drop = ("wall_s", "tokens_per_s")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(d / "metrics.jsonl")]
            for d in (sweep / "1", single)]
    assert len(rows[0]) == 600 and rows[0] == rows[1]
    assert json.loads((sweep / "1" / "summary.json").read_text())["final"] == \
        json.loads((single / "summary.json").read_text())["final"]


@needs_fast_blas
def test_threads_the_user_set_stay(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(["-m", *FAST, "train.steps=2,300", f"hydra.sweep.dir={sweep}"], OPENBLAS_NUM_THREADS="2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (sweep / "1" / "__main__.log").read_text()
    assert "threads=2 from" in log and "BLAS thread" not in log  # preloaded with the user's 2, never changed


def test_the_launcher_publishes_more_jobs_at_once_and_fewer_after_a_pause(monkeypatch):
    """Between two Optuna trials a slot is free for a moment: that is not yet fewer jobs."""
    from hydra_plugins.scu_launcher import _core

    monkeypatch.setenv(core_share.ENV_VAR, "1")
    clock = [100.0]
    monkeypatch.setattr(_core.time, "monotonic", lambda: clock[0])
    pool = _core.Pool(3)
    read = lambda: int(open(pool.share[0]).read())  # noqa: E731
    taken = [pool.free.pop() for _ in range(3)]
    pool.publish()
    assert read() == 3
    pool.free.append(taken.pop())
    pool.publish()
    clock[0] += 1.0
    pool.publish()
    assert read() == 3  # a moment: the next trial may take the slot
    pool.free.pop()
    pool.publish()
    pool.free.append(taken.pop())
    clock[0] += 1.5
    pool.publish()
    assert read() == 3  # the pause started again when the slot was taken
    clock[0] += _core.FEWER_AFTER_S
    pool.publish()
    assert read() == 2
    path = pool.share[0]
    del pool
    gc.collect()
    assert not os.path.exists(path)  # the file goes with its pool


def test_no_shared_cores_unless_the_sweep_chose_the_threads(monkeypatch):
    from hydra_plugins.scu_launcher import _core

    monkeypatch.delenv(core_share.ENV_VAR, raising=False)
    assert _core.Pool(3).share is None
    monkeypatch.setenv(core_share.ENV_VAR, "1")
    assert _core.Pool(1).share is None and _core.Pool(2).share is not None


@pytest.mark.parametrize("user", [None, "4"])
def test_a_sweep_sets_one_thread_per_job_and_puts_the_environment_back(tmp_path, monkeypatch, user):
    from omegaconf import OmegaConf

    from scu_sweep.sweeps.callbacks import SweepReport

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", core_share.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    if user:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", user)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "launcher": {"n_jobs": -1}}})
    cb = SweepReport()
    cb.on_multirun_start(cfg)
    during = {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", core_share.ENV_VAR)}
    cb.on_multirun_end(cfg)
    after = {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", core_share.ENV_VAR)}
    assert during == {"OPENBLAS_NUM_THREADS": user or "1", "OMP_NUM_THREADS": "1",
                      core_share.ENV_VAR: None if user else "1"}
    assert after == {"OPENBLAS_NUM_THREADS": user, "OMP_NUM_THREADS": None, core_share.ENV_VAR: None}
