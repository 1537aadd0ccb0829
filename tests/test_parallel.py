"""Parallel work on one machine: multirun jobs in spawned workers, and data-parallel ranks."""

from __future__ import annotations

import json

import pytest

from scu_sweep.records import read_jsonl

from conftest import cli

# 150 steps each (~3 s of training after a ~2 s load)
ARGS = ["-m", "model=tiny", "logger=none", "train.steps=150", "saturation.enabled=false", "train.eval_every=10",
        "prior.sigma=0.012", "target_s=0.02,0.05"]
SAME = ("step", "loss", "data_bpt", "param_bpt", "s_ratio", "s_ema", "lambda", "integral", "val_data_bpt")


def test_parallel_multirun_matches_sequential(tmp_path):
    par, seq = tmp_path / "par", tmp_path / "seq"
    p = cli(ARGS + ["hydra.launcher.n_jobs=2", f"hydra.sweep.dir={par}"])
    assert p.returncode == 0, p.stderr[-2000:]
    # one BLAS thread, as each worker has: a DYNAMIC_ARCH OpenBLAS may sum in another order with two
    s = cli(ARGS + ["hydra/launcher=basic", f"hydra.sweep.dir={seq}"],
            env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert s.returncode == 0, s.stderr[-2000:]
    summaries = []
    for job in ("0", "1"):
        a, b = read_jsonl(par / job / "metrics.jsonl"), read_jsonl(seq / job / "metrics.jsonl")
        assert [{k: r.get(k) for k in SAME} for r in a] == [{k: r.get(k) for k in SAME} for r in b]
        summaries.append(json.loads((par / job / "summary.json").read_text()))
    # Two worker processes, running at the same time.
    assert summaries[0]["pid"] != summaries[1]["pid"]
    # Each job from the config its worker writes as it starts to its summary, written last:
    # loads included, so a worker spawned late still overlaps; jobs run in turn never do.
    (s0, e0), (s1, e1) = [((par / j / ".hydra" / "config.yaml").stat().st_mtime,
                           (par / j / "summary.json").stat().st_mtime) for j in ("0", "1")]
    assert s0 < e1 and s1 < e0
    assert (par / "sweep_summary.csv").read_text().count("\n") == 3


def test_two_ranks_reproduce_one_rank(tmp_path):
    """train.ranks=2 (mx.distributed, ring on loopback) = ranks=1 with the same global batch and seed."""
    import numpy as np
    from safetensors.numpy import load_file

    base = ["model=tiny", "logger=none", "train.steps=20", "train.eval_every=10", "prior.sigma=0.012"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(base + [f"hydra.run.dir={one}"]).returncode == 0
    p = cli(base + ["train.ranks=2", f"hydra.run.dir={two}"])
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert len(a) == len(b) == 20
    for ra, rb in zip(a, b):
        for k in ("loss", "s_ratio", "lambda", "param_bpt", "val_data_bpt"):
            if ra.get(k) is not None:
                # float32 sums in another order: agreement to ~1e-6 relative, far below any effect of λ
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (ra["step"], k)
    assert json.loads((two / "summary.json").read_text())["ranks"] == 2
    wa, wb = load_file(str(one / "adapters/adapters.safetensors")), load_file(str(two / "adapters/adapters.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        # Adam divides by √v: an element whose gradient is near zero turns fp32 reduction-order
        # differences into update differences far below lr (3e-4) but above 1e-6
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-3, atol=1e-5)


def test_ranks_must_divide_the_batch(tmp_path):
    p = cli(["model=tiny", "logger=none", "train.ranks=3", f"hydra.run.dir={tmp_path}"])
    assert p.returncode == 2 and "train.ranks=3" in p.stderr and not (tmp_path / "summary.json").exists()
