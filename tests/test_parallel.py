"""Parallel multirun jobs (joblib/loky workers, spawned): same results as one at a time."""

from __future__ import annotations

import json

from scu_sweep.records import read_jsonl

from conftest import cli

ARGS = ["-m", "model=tiny", "logger=none", "train.steps=40", "train.eval_every=10", "prior.sigma=0.012",
        "target_s=0.02,0.05"]
SAME = ("step", "loss", "data_bpt", "param_bpt", "s_ratio", "s_ema", "lambda", "integral", "val_data_bpt")


def test_parallel_multirun_matches_sequential(tmp_path):
    par, seq = tmp_path / "par", tmp_path / "seq"
    p = cli(ARGS + ["hydra.launcher.n_jobs=2", f"hydra.sweep.dir={par}"])
    assert p.returncode == 0, p.stderr[-2000:]
    s = cli(ARGS + ["hydra/launcher=basic", f"hydra.sweep.dir={seq}"])
    assert s.returncode == 0, s.stderr[-2000:]
    summaries = []
    for job in ("0", "1"):
        a, b = read_jsonl(par / job / "metrics.jsonl"), read_jsonl(seq / job / "metrics.jsonl")
        assert [{k: r.get(k) for k in SAME} for r in a] == [{k: r.get(k) for k in SAME} for r in b]
        summaries.append(json.loads((par / job / "summary.json").read_text()))
    # Two worker processes, running at the same time.
    assert summaries[0]["pid"] != summaries[1]["pid"]
    (s0, e0), (s1, e1) = [(x["started_at"], x["started_at"] + x["wall_s"]) for x in summaries]
    assert s0 < e1 and s1 < e0
    assert (par / "sweep_summary.csv").read_text().count("\n") == 3
