"""End to end on model=tiny: files of DESIGN §3, formulas in metrics.jsonl, seeds, fixed λ."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from pathlib import Path

import pytest

from scu_sweep.records import read_jsonl

from conftest import cli, compose_cfg

FAST = ["model=tiny", "logger=none", "train.steps=30", "train.eval_every=10", "train.val_batches=2", "prior.sigma=0.012"]


def run_inproc(tmp_path: Path, overrides) -> tuple[dict, list]:
    from scu_sweep.run import run

    cfg = compose_cfg(FAST + list(overrides))
    run(cfg, tmp_path)
    return json.loads((tmp_path / "summary.json").read_text()), read_jsonl(tmp_path / "metrics.jsonl")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = cli(FAST + [f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_run_writes_the_promised_files(cli_run):
    s = json.loads((cli_run / "summary.json").read_text())
    for key in ("target_s", "kp", "ki", "prior_sigma", "final", "best", "stop_reason", "prune_reason",
                "saturation_step", "adapter_step", "steps_run", "tokens_seen", "train_tokens", "val_tokens",
                "trainable_params", "wall_s", "tokens_per_s", "adapter_path"):
        assert key in s, key
    assert s["stop_reason"] in ("saturated", "max_steps")
    assert s["tokens_seen"] == s["steps_run"] * 4 * 128
    rows = read_jsonl(cli_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, s["steps_run"] + 1))
    for r in rows:
        for key in ("step", "loss", "data_bpt", "param_bpt", "s_ratio", "lambda", "integral", "lr", "tokens", "wall_s"):
            assert key in r, key
    assert all("val_data_bpt" in r for r in rows if r["step"] % 10 == 0)
    adapter = cli_run / "adapters"
    assert (adapter / "adapters.safetensors").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(cfg["model"]).is_dir() and cfg["fine_tune_type"] == "lora"


def test_every_optuna_objective_is_a_number_of_a_real_summary(cli_run):
    from scu_sweep.records import OBJECTIVES

    s = json.loads((cli_run / "summary.json").read_text())
    for key in OBJECTIVES:
        value = s
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and math.isfinite(value), key


def test_written_files_take_the_umask_like_any_new_file(cli_run):
    """Atomic writes go through a temp file; it must not keep mkstemp's 0600 (another user who can
    read the weights could not read adapter_config.json, and mlx_lm.load would fail for them)."""
    mask = os.umask(0)
    os.umask(mask)
    for name in ("summary.json", "adapters/adapter_config.json", "adapters/README.md",
                 "adapters/parameter_analysis.json", "adapters/adapters.safetensors", "metrics.jsonl"):
        assert stat.S_IMODE((cli_run / name).stat().st_mode) == 0o666 & ~mask, name


def test_adapter_loads_with_mlx_lm_and_matches_trainable_count(cli_run):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    s = json.loads((cli_run / "summary.json").read_text())
    cfg = json.loads((cli_run / "adapters" / "adapter_config.json").read_text())
    model, tok = load(cfg["model"], adapter_path=str(cli_run / "adapters"))
    saved = mx.load(str(cli_run / "adapters" / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    assert sum(v.size for v in saved.values()) == s["trainable_params"]
    for k, v in saved.items():
        assert mx.array_equal(params[k], v), k
    # tiny: 2 layers × (q,k,v,o: 64→64/32, gate/up 64→128, down 128→64) with the default r=16
    dims = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert s["trainable_params"] == 2 * sum(16 * (i + o) for i, o in dims)


def test_metrics_obey_their_formulas(cli_run):
    for r in read_jsonl(cli_run / "metrics.jsonl"):
        assert r["data_bpt"] == pytest.approx(r["loss"] / math.log(2), rel=1e-6)
        assert r["s_ratio"] == pytest.approx(r["param_bpt"] / (r["param_bpt"] + r["data_bpt"]), rel=1e-6)
        if "val_loss" in r:
            assert r["val_data_bpt"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-6)
            assert r["val_s_ratio"] == pytest.approx(r["param_bpt"] / (r["param_bpt"] + r["val_data_bpt"]), rel=1e-6)


def _adapter(run_dir: Path) -> dict:
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters" / "adapters.safetensors")).items()}


def _saved_param_bpt(run_dir: Path, summary: dict) -> float:
    """ParamBPT of the tensors in the run's adapters.safetensors, in float64."""
    ssq = sum(float((v.astype("float64") ** 2).sum()) for v in _adapter(run_dir).values())
    return ssq / (2 * summary["prior_sigma"] ** 2 * summary["train_tokens"] * math.log(2))


def test_final_param_bpt_is_that_of_the_saved_adapter(cli_run):
    """Row ParamBPT is taken after the step's update, so the kept adapter's tensors give it exactly."""
    s = json.loads((cli_run / "summary.json").read_text())
    assert s["final"]["param_bpt"] == pytest.approx(_saved_param_bpt(cli_run, s), rel=1e-5)


def test_the_kept_adapter_is_the_best_in_band_evaluation_and_survives_a_restart(tmp_path, monkeypatch):
    """saturation.keep=best_in_band: of the evaluations whose S (ParamBPT over val DataBPT +
    ParamBPT) is within s_tolerance of the target, the one with the lowest validation DataBPT;
    its tensors are what is saved even though training went on, also across a restart."""
    import numpy as np

    import scu_sweep.run as run_mod
    from scu_sweep.scu.saturation import keeps

    # fixed λ: ParamBPT grows and val DataBPT falls, so S from validation drifts up through the run
    common = ["controller.fixed=true", "controller.lambda_init=1e-3", "controller.lambda_min=1e-3",
              "saturation.enabled=false", "train.lr=3e-3", "train.checkpoint_every=5"]
    last, rows = run_inproc(tmp_path / "last", common + ["saturation.keep=last"])
    assert last["adapter_step"] == last["steps_run"] == 30 and last["adapter_kept"] == "last"
    evals = [r for r in rows if "val_data_bpt" in r]
    for r in evals:
        assert r["val_s_ratio"] == pytest.approx(r["param_bpt"] / (r["param_bpt"] + r["val_data_bpt"]), rel=1e-9)
    target = evals[0]["val_s_ratio"]  # step 10's S: later evaluations have drifted out of a 2 % band
    kept = None
    for r in evals:
        if keeps(r["val_data_bpt"], r["param_bpt"], kept and kept["val_data_bpt"], target, 0.02):
            kept = r
    best_val = min(evals, key=lambda r: r["val_data_bpt"])
    assert kept["step"] == 10 and best_val["step"] != 10  # neither the last nor the best overall

    over = common + [f"target_s={target!r}", "saturation.s_tolerance=0.02"]
    s, _ = run_inproc(tmp_path / "best", over)
    assert s["adapter_kept"] == "best_in_band" and s["adapter_step"] == 10 and s["steps_run"] == 30
    assert s["final"] == pytest.approx({k: kept.get(k) for k in s["final"]}, rel=1e-9)
    assert _saved_param_bpt(tmp_path / "best", s) == pytest.approx(kept["param_bpt"], rel=1e-5)
    assert kept["param_bpt"] < 0.99 * rows[-1]["param_bpt"]  # the step-30 tensors would not pass

    real = run_mod.make_sinks

    def crashing(*a, **k):  # dies at step 22, after the checkpoint of step 20 (which holds step 10's adapter)
        sinks = real(*a, **k)
        log = sinks.log

        def log_row(row):
            if row["step"] == 22:
                raise KeyboardInterrupt
            log(row)
        sinks.log = log_row
        return sinks

    monkeypatch.setattr(run_mod, "make_sinks", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_inproc(tmp_path / "cut", over)
    monkeypatch.setattr(run_mod, "make_sinks", real)
    s2, _ = run_inproc(tmp_path / "cut", over)
    assert s2["resumed_from_step"] == 20 and s2["adapter_step"] == 10
    saved, again = _adapter(tmp_path / "best"), _adapter(tmp_path / "cut")
    assert saved.keys() == again.keys() and all(np.array_equal(saved[k], again[k]) for k in saved)


def test_same_seed_same_losses_other_seed_differs(tmp_path):
    a = run_inproc(tmp_path / "a", ["train.steps=5"])[1]
    b = run_inproc(tmp_path / "b", ["train.steps=5"])[1]
    c = run_inproc(tmp_path / "c", ["train.steps=5", "train.seed=1"])[1]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_large_fixed_lambda_shrinks_param_bpt(tmp_path):
    common = ["controller.fixed=true", "train.steps=40", "saturation.enabled=false", "train.lr=3e-3"]
    big = run_inproc(tmp_path / "big", common + ["controller.lambda_init=10"])[0]
    small = run_inproc(tmp_path / "small", common + ["controller.lambda_init=1e-4", "controller.lambda_min=1e-4"])[0]
    assert big["final"]["lambda"] == 10 and small["final"]["lambda"] == 1e-4
    assert big["final"]["param_bpt"] < 0.5 * small["final"]["param_bpt"]


def test_saturation_disabled_runs_to_train_steps(tmp_path):
    s, rows = run_inproc(tmp_path, ["saturation.enabled=false", "saturation.patience=0", "saturation.window=2",
                                    "saturation.s_tolerance=10", "saturation.lambda_eps=100", "train.steps=12"])
    assert s["stop_reason"] == "max_steps" and s["steps_run"] == 12 and s["saturation_step"] is None


def test_loose_saturation_rule_stops_and_keeps_that_adapter(tmp_path):
    # A rule every step satisfies once the window is full: the run must stop right there.
    s, rows = run_inproc(tmp_path, ["saturation.patience=0", "saturation.window=3", "saturation.s_tolerance=10",
                                    "saturation.lambda_eps=100", "saturation.min_steps=0", "train.steps=30"])
    assert s["stop_reason"] == "saturated" and s["saturation_step"] == 4 == s["adapter_step"] == rows[-1]["step"]
    assert "val_data_bpt" in rows[-1] and s["final"]["val_data_bpt"] == pytest.approx(rows[-1]["val_data_bpt"])


def test_multirun_three_targets(tmp_path):
    proc = cli(["-m", *FAST, "target_s=0.02,0.03,0.05", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    targets = sorted(json.loads((tmp_path / str(i) / "summary.json").read_text())["target_s"] for i in range(3))
    assert targets == [0.02, 0.03, 0.05]
    with open(tmp_path / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and sorted(float(r["target_s"]) for r in rows) == targets


@pytest.mark.slow
def test_model_tiny_alone_reaches_its_target_and_saturates(tmp_path):
    """No prior= override: the tiny model's own σ; the default rule stops at a validation plateau."""
    from scu_sweep.run import run

    cfg = compose_cfg(["model=tiny", "logger=none"])
    run(cfg, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert s["prior_sigma"] == 0.012 and s["stop_reason"] == "saturated"
    assert s["adapter_step"] <= s["saturation_step"] < cfg.train.steps and s["adapter_kept"] == "best_in_band"
    final = s["final"]
    s_kept = final["param_bpt"] / (final["param_bpt"] + final["val_data_bpt"])
    assert abs(s_kept / s["target_s"] - 1) < 0.10
    in_band = [r for r in rows if "val_data_bpt" in r and r["step"] <= s["saturation_step"]
               and abs(r["val_s_ratio"] / s["target_s"] - 1) <= 0.10]
    assert s["adapter_step"] == min(in_band, key=lambda r: r["val_data_bpt"])["step"]  # the best in band, not just any
    vals = [r["val_data_bpt"] for r in rows if "val_data_bpt" in r]
    assert vals.index(min(vals)) <= len(vals) - 3  # the last two evaluations did not beat the best


def test_the_detector_counts_epochs_of_this_corpus_and_batch(tmp_path, monkeypatch):
    """saturation.patience_epochs needs the run's epoch length: training blocks / batch size."""
    from scu_sweep.scu.saturation import SaturationDetector
    from scu_sweep.training import loop

    seen = []

    class Recording(SaturationDetector):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append(self.steps_per_epoch)

    monkeypatch.setattr(loop, "SaturationDetector", Recording)
    s, _ = run_inproc(tmp_path, ["data.max_tokens=4000", "train.batch_size=3", "train.seq_len=64", "train.steps=2"])
    assert s["train_tokens"] % 64 == 0 and seen == [s["train_tokens"] / 64 / 3]


def test_the_default_holds_s_on_the_last_epochs_mean_data_bpt(tmp_path):
    """The default (controller.smooth=data_bpt_epoch): Ŝ = ParamBPT/(D̄ + ParamBPT), D̄ the mean
    DataBPT of the last epoch's steps (training blocks / batch size, here fewer than 1/ema_alpha)."""
    s, rows = run_inproc(tmp_path, ["data.max_tokens=4000", "train.batch_size=3",
                                    "train.seq_len=64", "train.steps=30", "train.log_every=1",
                                    "saturation.enabled=false"])
    n = round(s["train_tokens"] / 64 / 3)
    assert 10 < n < 33 and [r["step"] for r in rows] == list(range(1, 31))
    for i, r in enumerate(rows):
        recent = [q["data_bpt"] for q in rows[max(0, i - n + 1):i + 1]]
        d_bar = sum(recent) / len(recent)
        assert r["s_ema"] == pytest.approx(r["param_bpt"] / (d_bar + r["param_bpt"]), rel=1e-9)
