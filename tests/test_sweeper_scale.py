"""The optuna sweeper at scale: worker processes, shared storages, launcher recipes, and
the study on the real runner (``model=tiny``). Most tests here take 5-50 s: marked slow.
"""

import json
import math
import os
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

try:
    from tests import sweeper_helpers as h
except ImportError:  # tests/ is not a package
    import sweeper_helpers as h

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def _study_of(sweep_dir: Path):
    return h.load_study(f"sqlite:///{sweep_dir}/optuna.db", _results(sweep_dir)["study_name"])


# ---------------------------------------------------------------- parallel trials


def _intervals(sweep_dir: Path):
    return {n: (s["t_start"], s["t_end"], s["pid"])
            for n, s in h.job_files(sweep_dir, "summary.json").items()}


def _max_overlap(intervals) -> int:
    events = sorted([(a, 1) for a, _, _ in intervals] + [(b, -1) for _, b, _ in intervals])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


@pytest.mark.slow
def test_worker_processes_run_trials_without_a_batch_barrier(tmp_path):
    sw = tmp_path / "sw"
    h.run_app(sw, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
              "x=interval(0,1)", "hydra.sweeper.n_trials=5", "hydra/sweeper/pruner=none",
              "step_s=0.05", "slow_trial=0", "slow_step_s=1.0")
    iv = _intervals(sw)
    assert sorted(iv) == [0, 1, 2, 3, 4]
    assert len({pid for _, _, pid in iv.values()}) == 2  # two worker processes
    assert _max_overlap(iv.values()) == 2
    # trial 0 holds one slot ~8 s; the other slot goes on with 1, 2, 3 meanwhile
    assert all(iv[n][0] < iv[0][1] for n in (1, 2, 3))


def test_in_process_launcher_runs_one_trial_at_a_time(tmp_path):
    sw = tmp_path / "sw"
    proc = h.run_app(sw, "hydra.sweeper.n_jobs=2", "x=interval(0,1)", "hydra.sweeper.n_trials=3",
                     "step_s=0.05")
    iv = _intervals(sw)
    assert len({pid for _, _, pid in iv.values()}) == 1 and _max_overlap(iv.values()) == 1
    assert "trials run one at a time" in proc.stderr + proc.stdout


# ---------------------------------------------------------------- shared storage


def _shared_study(storage: str, sweep_root: Path, workers=3, trials=3):
    procs = h.start_sweeps(workers, sweep_root, "x=interval(0,1)",
                           f"hydra.sweeper.n_trials={trials}",
                           f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
                           "steps=4")
    h.wait_all(procs, sweep_root)
    study = h.load_study(storage, "shared")
    assert sorted(t.number for t in study.trials) == list(range(workers * trials))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    for t in study.trials:  # every trial ran in exactly one job, which names it
        job = json.loads((Path(t.user_attrs["job_dir"]) / "trial.json").read_text())
        assert job["number"] == t.number and job["state"] == t.state.name
    return study


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_independent_sweeps_share_one_study(tmp_path, kind):
    storage = {"sqlite": f"sqlite:///{tmp_path}/o.db", "journal": f"journal:{tmp_path}/o.log"}
    study = _shared_study(storage[kind], tmp_path)  # checks every trial (see above)
    assert len(study.trials) == 3 * 3


@pytest.mark.slow
def test_independent_sweeps_share_one_postgresql_study(tmp_path):
    have = h.pg_bin("initdb") and h.pg_bin("pg_ctl")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        have = False
    if not have:
        if os.environ.get("SCU_REQUIRE_POSTGRES"):
            pytest.fail("SCU_REQUIRE_POSTGRES is set but initdb/pg_ctl or psycopg2 is missing")
        pytest.skip("PostgreSQL (initdb, pg_ctl) or psycopg2 not installed")
    with h.postgres_server() as url:
        _shared_study(url, tmp_path)


# ---------------------------------------------------------------- launcher recipes


@pytest.mark.slow
def test_local_workers_script_shares_one_study(tmp_path):
    sw = tmp_path / "sw"
    env = dict(h.env(), SCU_APP=" ".join(h.APP), SWEEP_DIR=str(sw), STUDY="workers")
    proc = subprocess.run(["bash", str(h.REPO / "launchers" / "local_workers.sh"), "2",
                           "x=interval(0,1)", "hydra.sweeper.n_trials=2", "steps=2"],
                          cwd=h.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = h.load_study(f"journal:{sw}/optuna.journal", "workers")
    assert len(study.trials) == 4
    assert sorted(h.job_files(sw, "trial.json")) == [0, 1, 2, 3]
    assert "4 trials" in proc.stdout
    res = _results(sw)
    assert sum(res["study"].values()) == 4 and "running" not in res["study"]
    assert res["dashboard"] == f"optuna-dashboard {sw}/optuna.journal"


@pytest.mark.slow
def test_a_worker_that_starts_after_its_sibling_finished_runs_its_own_trials(tmp_path):
    """local_workers.sh on a loaded machine: worker 0 runs its trials and exits before worker 1
    starts. Worker 1 must still run its own n_trials, not take worker 0's finished trials for
    its own from before a kill; worker 0 rerun counts its own as done."""
    sw = tmp_path / "sw"
    storage = f"journal:{sw}/optuna.journal"
    common = ("x=interval(0,1)", "hydra.sweeper.n_trials=2", "steps=2", "hydra/launcher=basic",
              f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.study_name=workers")
    h.run_app(sw, *common, "hydra.sweeper.worker=0")
    h.run_app(sw, *common, "hydra.sweeper.worker=1")
    assert len(h.load_study(storage, "workers").trials) == 4
    h.run_app(sw, *common, "hydra.sweeper.worker=0")
    assert len(h.load_study(storage, "workers").trials) == 4


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from scu_sweep.config import register

    register()
    with initialize_config_dir(str(h.REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=optuna_kp_ki_target",
                                           "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min > 0
    assert launcher.array_parallelism == cfg.hydra.sweeper.n_jobs


@pytest.mark.slow
def test_submitit_runs_trials_as_separate_processes(tmp_path):
    """The Slurm recipe's launcher code path, through submitit's local executor."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sw = tmp_path / "sw"
    h.run_app(sw, "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2", "x=interval(0,1)",
              "hydra.sweeper.n_trials=3", "step_s=0.6")  # ~5 s a trial: two overlap however late one starts
    iv = _intervals(sw)
    assert sorted(iv) == [0, 1, 2] and len({pid for _, _, pid in iv.values()}) == 3
    assert _max_overlap(iv.values()) == 2
    assert {t.state.name for t in _study_of(sw).trials} <= {"COMPLETE", "PRUNED"}


@pytest.mark.slow
def test_ray_workers_share_one_study(tmp_path):
    pytest.importorskip("ray")
    sw = tmp_path / "sw"
    proc = subprocess.run(
        [h.APP[0], str(h.REPO / "launchers" / "ray_workers.py"), "--workers", "2",
         "--storage", f"journal:{sw}/optuna.journal", "--study", "ray", "--sweep-dir", str(sw),
         "--app", " ".join(h.APP), "--", "x=interval(0,1)", "hydra.sweeper.n_trials=1",
         "steps=2"], cwd=h.REPO, env=h.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(h.load_study(f"journal:{sw}/optuna.journal", "ray").trials) == 2


# ---------------------------------------------------------------- the real runner


def _tiny_study(sweep_dir: Path, *overrides: str):
    cmd = [h.APP[0], "-m", "scu_sweep"]
    proc = subprocess.run([*cmd, "experiment=optuna_tiny_kp_ki",
                           f"hydra.sweep.dir={sweep_dir}", *overrides], cwd=h.REPO, env=h.env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _results(sweep_dir)
    study = h.load_study(f"sqlite:///{sweep_dir}/optuna.db", res["study_name"])
    return res, study


@pytest.mark.slow
def test_tiny_study_prunes_and_saves_steps(tmp_path):
    pruned_res, pruned_study = _tiny_study(tmp_path / "median")
    full_res, full_study = _tiny_study(tmp_path / "none", "hydra/sweeper/pruner=none")
    states = [t.state.name for t in pruned_study.trials]
    print(f"\nwith median pruning: {pruned_res['trials']}, {pruned_res['total_steps']} steps; "
          f"without: {full_res['trials']}, {full_res['total_steps']} steps; "
          f"best {pruned_res['best_value']:.4f} at {pruned_res['best_params']}")
    assert len(states) == 8 and states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 1
    assert pruned_res["trials"] == {"complete": states.count("COMPLETE"),
                                    "pruned": states.count("PRUNED"), "fail": 0}
    # without a pruner only targets the controller cannot hold end early (λ pinned at a bound)
    assert full_res["trials"]["fail"] == 0 and len(full_study.trials) == 8
    assert {t.user_attrs["reason"] for t in full_study.trials if t.state.name == "PRUNED"} <= {"unreachable"}
    assert full_res["total_steps"] == sum(t.user_attrs["steps_run"] for t in full_study.trials)
    assert "pruner" in {t.user_attrs["reason"] for t in pruned_study.trials if t.state.name == "PRUNED"}
    assert pruned_res["total_steps"] < full_res["total_steps"]
    assert pruned_res["best_params"] == pruned_study.best_params
    # a search, not ties: Kp/Ki change the result (the demo's target once left λ pinned at its
    # floor, every trial the same curve), and a pruned trial was behind the best when cut
    values = [t.value for t in full_study.trials if t.state.name == "COMPLETE"]
    assert len(values) >= 2 and max(values) - min(values) > 0.1, values
    best = pruned_study.best_trial
    for t in pruned_study.trials:
        if t.state.name == "PRUNED":
            step = max(t.intermediate_values)
            assert t.intermediate_values[step] > best.intermediate_values[step], (t.number, step)
    csv = (tmp_path / "median" / "sweep_summary.csv").read_text()
    assert "trial_state" in csv and "PRUNED" in csv
    assert math.isfinite(pruned_res["best_value"])
