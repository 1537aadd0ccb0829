"""The optuna sweeper: discovery, search-space parsing, verdicts, studies of a tiny app.

Studies run ``tests/sweeper_app/app.py`` (a synthetic loss curve with scu_sweep's
run-dir contract) in subprocesses, a few seconds each. Worker processes, shared
storages, launcher recipes and the study on the real runner: test_sweeper_scale.py.
"""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution as Cat
from optuna.distributions import FloatDistribution as Float
from optuna.distributions import IntDistribution as Int

try:
    from tests import sweeper_helpers as h
except ImportError:  # tests/ is not a package
    import sweeper_helpers as h

from hydra_plugins.scu_optuna_sweeper._impl import resolve_storage
from hydra_plugins.scu_optuna_sweeper._space import distribution, format_value, grid, quote
from hydra_plugins.scu_optuna_sweeper._verdict import judge

optuna.logging.set_verbosity(optuna.logging.WARNING)
PARSER = OverridesParser.create()


def _parse(line: str):
    return PARSER.parse_overrides([line])[0]


def _results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def _study_of(sweep_dir: Path):
    res = _results(sweep_dir)
    return h.load_study(f"sqlite:///{sweep_dir}/optuna.db", res["study_name"])


# ---------------------------------------------------------------- discovery


def test_optuna_option_resolves_to_our_sweeper():
    from hydra import compose, initialize_config_dir
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    with initialize_config_dir(str(h.APP_DIR / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/sweeper=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == h.PLUGIN_TARGET
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert cfg.hydra.sweeper.objective == "final.val_data_bpt"
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert h.PLUGIN_TARGET in found


@pytest.mark.parametrize("group, option, target", [
    ("sampler", "random", "optuna.samplers.RandomSampler"),
    ("sampler", "cmaes", "optuna.samplers.CmaEsSampler"),
    ("sampler", "grid", "optuna.samplers.GridSampler"),
    ("pruner", "successive_halving", "optuna.pruners.SuccessiveHalvingPruner"),
    ("pruner", "hyperband", "optuna.pruners.HyperbandPruner"),
    ("pruner", "none", "optuna.pruners.NopPruner"),
])
def test_sampler_and_pruner_options_compose(group, option, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(h.APP_DIR / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/sweeper=optuna",
                                           f"hydra/sweeper/{group}={option}"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper[group]._target_ == target


def test_project_presets_compose():
    from hydra import compose, initialize_config_dir

    from scu_sweep.config import register

    register()
    with initialize_config_dir(str(h.REPO / "conf"), version_base="1.3"):
        for name in ("optuna_kp_ki_target", "optuna_tiny_kp_ki"):
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
            assert cfg.hydra.sweeper._target_ == h.PLUGIN_TARGET
            assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
            assert cfg.hydra.sweeper.n_jobs == 2
            assert {"controller.kp", "controller.ki"} <= set(cfg.hydra.sweeper.params)
        for pruner in ("none", "hyperband"):  # presets leave the pruner's options alone
            cfg = compose("config", overrides=["experiment=optuna_tiny_kp_ki",
                                               f"hydra/sweeper/pruner={pruner}"],
                          return_hydra_config=True)
        cfg = compose("config", overrides=["experiment=optuna_tiny_kp_ki",
                                           "hydra/launcher=workers"], return_hydra_config=True)
        assert cfg.hydra.launcher.n_jobs == cfg.hydra.sweeper.n_jobs == 2


# ---------------------------------------------------------------- search space


@pytest.mark.parametrize("line, expected", [
    ("x=choice(1,2,3)", Cat((1, 2, 3))),
    ("x=a,b", Cat(("a", "b"))),
    ("x=choice(0.02, 0.03, 0.05)", Cat((0.02, 0.03, 0.05))),
    ("x=choice(true,false)", Cat((True, False))),
    ("x=range(1,5)", Int(1, 4)),
    ("x=range(0,10,3)", Int(0, 9, step=3)),
    ("x=range(10,0,-2)", Int(2, 10, step=2)),
    ("x=range(0.0,1.0,0.25)", Float(0.0, 0.75, step=0.25)),
    ("x=tag(log,range(1,9))", Int(1, 8, log=True)),
    ("x=interval(0.1,2.0)", Float(0.1, 2.0)),
    ("x=interval(1,10)", Float(1.0, 10.0)),
    ("x=tag(log,interval(0.01,1.0))", Float(0.01, 1.0, log=True)),
    ("x=tag(int,interval(2,64))", Int(2, 64)),
    ("x=tag(int,log,interval(2,64))", Int(2, 64, log=True)),
    ("x=5", None),
    ("model=tiny", None),
])
def test_override_to_distribution(line, expected):
    assert distribution(_parse(line)) == expected


@pytest.mark.parametrize("line, message", [
    ("x=glob(*)", "not supported"),
    ("x=tag(log,choice(1,2))", "do not apply to choice"),
    ("x=tag(loud,interval(0,1))", "unknown tag"),
    ("x=tag(log,range(0.0,1.0,0.5))", "integer bounds"),
    ("x=choice([1,2],[3])", "scalars"),
])
def test_unsupported_sweeps_are_refused(line, message):
    with pytest.raises(ValueError, match=message):
        distribution(_parse(line))


def test_grid_lists_every_point_and_refuses_intervals():
    space = {"a": Cat(("u", "v")), "b": Int(0, 9, step=3), "c": Float(0.0, 0.5, step=0.25)}
    assert grid(space) == {"a": ["u", "v"], "b": [0, 3, 6, 9], "c": [0.0, 0.25, 0.5]}
    with pytest.raises(ValueError, match="grid sampler"):
        grid({"d": Float(0.0, 1.0)})


@pytest.mark.parametrize("value", [0.1, 1e-05, 3, -2, True, False, None, "tiny",
                                   "smollm2_135m", "1", "true", "null", "a b", "it's",
                                   "back\\slash\\", "x=y,z", "sqlite:////tmp/a b/o.db"])
def test_values_survive_the_round_trip_through_override_text(value):
    parsed = _parse(f"k={format_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["postgresql://u:p'w@h/db", "journal:/tmp/x y.log", "a\\'b\\"])
def test_quote_round_trips(text):
    assert _parse(f"k={quote(text)}").value() == text


def test_storage_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None, Path("sw")) == f"sqlite:///{tmp_path}/sw/optuna.db"
    assert resolve_storage("sqlite:///rel.db", Path("sw")) == f"sqlite:///{tmp_path}/rel.db"
    assert resolve_storage("sqlite:////abs/o.db", Path("sw")) == "sqlite:////abs/o.db"
    assert resolve_storage("journal:j.log", Path("sw")) == f"journal:{tmp_path}/j.log"
    assert resolve_storage("journal:///abs/j.log", Path("sw")) == "journal:/abs/j.log"
    url = "postgresql+psycopg2://u@127.0.0.1:5432/db"
    assert resolve_storage(url, Path("sw")) == url
    with pytest.raises(ValueError, match="in-memory"):
        resolve_storage("sqlite:///:memory:", Path("sw"))
    with pytest.raises(ValueError, match="journal:/some/path.log"):
        resolve_storage("/some/path.log", Path("sw"))  # a file path is not a URL: say the journal form


@pytest.mark.parametrize("override,named,hint", [
    ("hydra.sweeper.pruner=none", "hydra.sweeper.pruner='none'", "hydra/sweeper/pruner=NAME"),
    ("hydra.sweeper.storage=/some/path.log", "hydra.sweeper.storage='/some/path.log'", "journal:/some/path.log"),
])
def test_bad_sweeper_values_get_one_line_and_exit_2(tmp_path, override, named, hint):
    from conftest import cli

    sweep_dir = tmp_path / "sw"
    proc = cli(["-m", "model=tiny", "logger=none", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                f"hydra.sweep.dir={sweep_dir}", override], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"scu_sweep: error: {named}: allowed") and hint in lines[-1]
    assert "Traceback" not in proc.stderr and not list(sweep_dir.rglob("summary.json"))


# ---------------------------------------------------------------- verdicts


def _job(tmp_path, summary=None, failure=None) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if failure is not None:
        (d / "failure.json").write_text(json.dumps(failure))
    return d


@pytest.mark.parametrize("summary, failure, state, value", [
    ({"final": {"val_data_bpt": 3.5}, "stop_reason": "saturated", "steps_run": 40}, None,
     "COMPLETE", 3.5),
    ({"final": {"val_data_bpt": 3.5}, "stop_reason": "pruned", "prune_reason": "pruner"}, None,
     "PRUNED", None),
    ({"final": {"val_data_bpt": 3.5}, "stop_reason": "pruned", "prune_reason": "unreachable"},
     None, "PRUNED", None),
    ({"final": {"val_data_bpt": float("nan")}, "stop_reason": "max_steps"}, None, "FAIL", None),
    ({"final": {"val_data_bpt": None}, "stop_reason": "max_steps"}, None, "FAIL", None),
    ({"final": {}, "stop_reason": "max_steps"}, None, "FAIL", None),
    ({"final": {"val_data_bpt": 3.5}, "stop_reason": "diverged"}, None, "FAIL", None),
    (None, {"stop_reason": "diverged", "error": "non-finite loss"}, "FAIL", None),
    (None, None, "FAIL", None),
])
def test_verdict_from_run_files(tmp_path, summary, failure, state, value):
    verdict = judge(_job(tmp_path, summary, failure), "final.val_data_bpt")
    assert (verdict.state, verdict.value) == (state, value)


def test_verdict_reads_the_configured_objective(tmp_path):
    job = _job(tmp_path, {"best": {"val_data_bpt": 2.0}, "final": {"val_data_bpt": 3.0}})
    assert judge(job, "best.val_data_bpt").value == 2.0
    assert judge(None, "final.val_data_bpt").state == "FAIL"


# ---------------------------------------------------------------- studies of the tiny app


def test_never_prune_completes_every_trial_with_its_summary_value(tmp_path):
    sw = tmp_path / "sw"
    h.run_app(sw, "x=interval(0,1)", "y=choice(0.0,0.5)", "hydra.sweeper.n_trials=3",
              "hydra/sweeper/pruner=none", "hydra.sweeper.pruner._target_=fake_pruners.NeverPrune")
    study, summaries = _study_of(sw), h.job_files(sw, "summary.json")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for t in study.trials:
        s = summaries[t.number]
        assert t.value == s["final"]["val_data_bpt"] and s["stop_reason"] == "max_steps"
        assert (s["x"], s["y"]) == (t.params["x"], t.params["y"])
        assert sorted(t.intermediate_values) == [2, 4, 6, 8]


def test_always_prune_prunes_every_trial_at_its_first_report(tmp_path):
    sw = tmp_path / "sw"
    h.run_app(sw, "x=interval(0,1)", "hydra.sweeper.n_trials=3", "hydra/sweeper/pruner=none",
              "hydra.sweeper.pruner._target_=fake_pruners.AlwaysPrune")
    study, summaries = _study_of(sw), h.job_files(sw, "summary.json")
    assert [t.state.name for t in study.trials] == ["PRUNED"] * 3
    assert all(s["stop_reason"] == "pruned" and s["prune_reason"] == "pruner"
               and s["steps_run"] == 2 for s in summaries.values())
    assert _results(sw)["total_steps"] == 6 and _results(sw)["best_value"] is None


def test_failures_fail_alone_and_results_match_the_storage(tmp_path):
    sw = tmp_path / "sw"
    h.run_app(sw, "mode=choice(ok,diverge,raise,nanobjective,unreachable)", "x=0.5",
              "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=20",
              "hydra.sweeper.max_failure_rate=1.0")
    study, trials = _study_of(sw), h.job_files(sw, "trial.json")
    by_mode = {t.params["mode"]: t for t in study.trials}
    assert len(study.trials) == 5  # n_trials capped at the grid's size
    assert {m: t.state.name for m, t in by_mode.items()} == {
        "ok": "COMPLETE", "diverge": "FAIL", "raise": "FAIL", "nanobjective": "FAIL",
        "unreachable": "PRUNED"}
    assert "non-finite" in trials[by_mode["diverge"].number]["reason"]
    assert trials[by_mode["unreachable"].number]["reason"] == "unreachable"
    assert "boom" in trials[by_mode["raise"].number]["reason"]  # the job's own exception
    # optimization_results.yaml and every trial.json agree with optuna.load_study
    res = _results(sw)
    assert (res["best_trial"], res["best_value"], res["best_params"]) == (
        study.best_trial.number, study.best_value, study.best_params)
    assert res["trials"] == {"complete": 1, "pruned": 1, "fail": 3}
    for t in study.trials:
        j = trials[t.number]
        assert (j["number"], j["state"], j["value"], j["params"]) == (
            t.number, t.state.name, t.value if t.state.name == "COMPLETE" else None, t.params)
        assert t.user_attrs["job_dir"] == str(sw / str(t.number))


def test_one_nan_trial_does_not_fail_the_sweep_by_default(tmp_path):
    sw = tmp_path / "sw"
    proc = h.run_app(sw, "mode=choice(ok,diverge)", "hydra/sweeper/sampler=grid")
    assert proc.returncode == 0
    assert sorted(t.state.name for t in _study_of(sw).trials) == ["COMPLETE", "FAIL"]


def test_too_many_failures_stop_the_sweep(tmp_path):
    sw = tmp_path / "sw"
    proc = h.run_app(sw, "mode=diverge", "x=interval(0,1)", "hydra.sweeper.n_trials=6",
                     "hydra.sweeper.max_failure_rate=0.2", check=False)
    assert proc.returncode != 0 and "max_failure_rate" in proc.stderr
    assert len(_study_of(sw).trials) == 2  # stopped once failed > 0.2 * 6


def test_command_line_overrides_win_over_config_params(tmp_path):
    sw = tmp_path / "sw"
    h.run_app(sw, "+hydra.sweeper.params.x='choice(0.1,0.2)'", "+hydra.sweeper.params.y='interval(0,1)'",
              "x=choice(0.9)", "steps=4", "hydra.sweeper.n_trials=2")
    summaries = h.job_files(sw, "summary.json").values()
    assert all(s["x"] == 0.9 and 0 <= s["y"] <= 1 and s["steps_run"] == 4 for s in summaries)


def test_seeded_random_sampler_repeats_its_params(tmp_path):
    params = []
    for i in range(2):
        h.run_app(tmp_path / f"sw{i}", "x=interval(0,1)", "hydra/sweeper/sampler=random",
                  "hydra.sweeper.seed=7", "hydra.sweeper.n_trials=2", "steps=2")
        params.append([t.params for t in _study_of(tmp_path / f"sw{i}").trials])
    assert params[0] == params[1]


@pytest.mark.parametrize("pruner", ["median", "successive_halving", "hyperband"])
def test_each_pruner_runs_a_study(tmp_path, pruner):
    sw = tmp_path / "sw"
    h.run_app(sw, "x=interval(0,1)", "hydra.sweeper.n_trials=3", f"hydra/sweeper/pruner={pruner}",
              "hydra/sweeper/sampler=random")
    study = _study_of(sw)
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert study.user_attrs["scu_sweep.pruner"]["_target_"].lower().startswith(
        "optuna.pruners." + pruner.replace("_", ""))


def test_cmaes_sampler_runs_a_study(tmp_path):
    pytest.importorskip("cmaes")
    sw = tmp_path / "sw"
    h.run_app(sw, "x=interval(0,1)", "y=interval(0,1)", "hydra.sweeper.n_trials=3",
              "hydra/sweeper/sampler=cmaes", "hydra.sweeper.seed=1", "hydra/sweeper/pruner=none")
    study = _study_of(sw)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert "cma:generation" in study.trials[2].system_attrs  # sampled by CMA-ES itself


def test_a_named_study_resumes_and_refuses_when_told_to(tmp_path):
    storage = f"sqlite:///{tmp_path}/shared.db"
    args = ("x=interval(0,1)", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=resume", "steps=2")
    h.run_app(tmp_path / "a", *args)
    h.run_app(tmp_path / "b", *args)
    assert len(h.load_study(storage, "resume").trials) == 4
    assert sorted(h.job_files(tmp_path / "b", "trial.json")) == [2, 3]
    proc = h.run_app(tmp_path / "c", *args, "hydra.sweeper.load_if_exists=false", check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr


def test_trials_a_live_worker_finished_are_not_counted_as_finished_before(tmp_path):
    """Workers sharing a sweep dir (launchers/local_workers.sh) each run their own n_trials:
    a trial another live worker finished is its, one whose process is gone counts (resume)."""
    import subprocess

    from hydra_plugins.scu_optuna_sweeper._impl import OWNER_ATTR, SWEEP_ATTR
    from scu_sweep.sweeps.resume import process_token

    sw, storage = tmp_path / "sw", f"sqlite:///{tmp_path}/shared.db"
    live, gone = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    tokens = {"live": process_token(live.pid), "gone": process_token(gone.pid)}
    gone.kill(), gone.wait()
    study = optuna.create_study(study_name="w", storage=storage)
    for owner in tokens.values():
        study.add_trial(optuna.trial.create_trial(
            params={"x": 0.5}, distributions={"x": Float(0, 1)}, value=1.0,
            user_attrs={SWEEP_ATTR: str(sw), OWNER_ATTR: owner}))
    try:
        h.run_app(sw, "x=interval(0,1)", "hydra.sweeper.n_trials=3", "steps=2",
                  f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=w")
    finally:
        live.kill(), live.wait()
    assert len(h.load_study(storage, "w").trials) == 2 + 2  # 3 minus the one of the gone process


def test_bad_sweeper_settings_are_named_at_once(tmp_path):
    proc = h.run_app(tmp_path / "sw", "x=interval(0,1)", "hydra.sweeper.direction=up",
                     "hydra.sweeper.n_jobs=0", "hydra.sweeper.objective=final.val_databpt", check=False)
    assert proc.returncode != 0
    assert "hydra.sweeper.direction='up': allowed minimize, maximize" in proc.stderr
    assert "hydra.sweeper.n_jobs=0: allowed an int >= 1" in proc.stderr
    assert "hydra.sweeper.objective='final.val_databpt': allowed a number of summary.json: " in proc.stderr
    assert not list((tmp_path / "sw").glob("*/summary.json"))  # before any trial ran


def test_a_typo_in_the_search_space_fails_before_any_trial(tmp_path):
    proc = h.run_app(tmp_path / "sw", "xx=interval(0,1)", check=False)
    assert proc.returncode != 0 and "xx" in proc.stderr
    assert not list((tmp_path / "sw").glob("*/summary.json"))


def test_telling_a_trial_another_process_finished_keeps_the_sweep_going(tmp_path, caplog):
    """If another sweep process told this sweep's trial first, its verdict stands: a
    warning, not an exception that would end this sweep."""
    from hydra_plugins.scu_optuna_sweeper._impl import OptunaSweeperImpl
    from hydra_plugins.scu_optuna_sweeper._verdict import Verdict
    from scu_sweep.sweeps.pruning import open_storage

    storage = f"sqlite:///{tmp_path}/o.db"
    sweeper = OptunaSweeperImpl.__new__(OptunaSweeperImpl)
    sweeper.backend = open_storage(storage)
    sweeper.study = optuna.create_study(study_name="s", storage=sweeper.backend)
    sweeper.cfg = {"max_failure_rate": 0.0}
    sweeper.n_trials, sweeper.failed, sweeper.stop, sweeper.verdicts = 2, 0, False, {}
    other = optuna.load_study(study_name="s", storage=storage)
    told, running = sweeper.study.ask(), sweeper.study.ask()
    other.tell(told.number, state=optuna.trial.TrialState.FAIL)
    sweeper._tell(told, Verdict("COMPLETE", 1.5), None)
    assert f"trial {told.number}: " in caplog.text and "finished" in caplog.text
    sweeper._tell(running, Verdict("COMPLETE", 2.5), None)
    states = {t.number: (t.state, t.value) for t in other.trials}
    assert states == {told.number: (optuna.trial.TrialState.FAIL, None),
                      running.number: (optuna.trial.TrialState.COMPLETE, 2.5)}
    assert sorted(sweeper.verdicts) == [told.number, running.number]
