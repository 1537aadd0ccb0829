"""scu_sweep.sweeps.pruning: the link from a run to its trial, through real Optuna storages."""

import math
import subprocess
import sys

import optuna
import pytest
from omegaconf import OmegaConf

try:
    from tests import sweeper_helpers as h
except ImportError:  # tests/ is not a package
    import sweeper_helpers as h

from scu_sweep.sweeps.pruning import (PRUNER_ATTR, NullReporter, OptunaReporter, Reporter,
                               build_pruner, display_url, make_reporter, open_storage)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(storage: str, pruner_spec=None, name="s"):
    study = optuna.create_study(study_name=name, storage=open_storage(storage))
    if pruner_spec is not None:
        study.set_user_attr(PRUNER_ATTR, pruner_spec)
    return study


def _link(storage, trial_number, name="s"):
    return {"storage": storage, "study_name": name, "trial_number": trial_number}


@pytest.fixture(params=["sqlite", "journal"])
def storage(request, tmp_path):
    return f"sqlite:///{tmp_path}/o.db" if request.param == "sqlite" else f"journal:{tmp_path}/o.log"


def test_imports_only_the_standard_library():
    code = ("import sys\n"
            "for m in ('optuna', 'hydra', 'omegaconf', 'mlx', 'sqlalchemy', 'wandb'):\n"
            "    sys.modules[m] = None\n"
            "from scu_sweep.sweeps.pruning import make_reporter\n"
            "r = make_reporter(None)\n"
            "assert r.report(1, 2.0) is False and r.in_study is False\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=h.REPO, env=h.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("cfg", [None, {}, {"storage": None, "study_name": None,
                                            "trial_number": None},
                                 OmegaConf.create({"storage": None, "study_name": None,
                                                   "trial_number": None})])
def test_outside_a_study_the_reporter_is_null(cfg):
    reporter = make_reporter(cfg)
    assert isinstance(reporter, NullReporter) and isinstance(reporter, Reporter)
    assert not reporter.in_study
    assert [reporter.report(s, 1e9) for s in range(3)] == [False] * 3


def test_a_partial_link_names_the_missing_keys():
    with pytest.raises(ValueError, match=r"pruning\.study_name, pruning\.trial_number"):
        make_reporter({"storage": "sqlite:///x.db"})


def test_reports_reach_the_stored_trial(storage):
    study = _study(storage, {"_target_": "optuna.pruners.NopPruner"})
    study.ask()
    trial = study.ask()  # trial number 1: the reporter must pick it, not trial 0
    reporter = make_reporter(OmegaConf.create(_link(storage, 1)))
    assert isinstance(reporter, OptunaReporter) and reporter.in_study
    assert reporter.report(10, 3.5) is False
    assert reporter.report(20, 3.25) is False
    assert reporter.report(30, math.nan) is False  # non-finite: skipped, the run handles it
    stored = h.load_study(storage, "s").trials
    assert stored[1].intermediate_values == {10: 3.5, 20: 3.25}
    assert stored[0].intermediate_values == {}
    assert trial.number == 1


@pytest.mark.parametrize("value, pruned", [(1.0, True), (0.4, False)])
def test_the_stored_pruner_decides(storage, value, pruned):
    _study(storage, {"_target_": "optuna.pruners.ThresholdPruner", "upper": 0.5}).ask()
    reporter = make_reporter(_link(storage, 0))
    assert reporter.report(5, value) is pruned
    assert reporter.pruned_step == (5 if pruned else None)


def test_median_pruner_compares_with_finished_trials(storage):
    study = _study(storage, {"_target_": "optuna.pruners.MedianPruner",
                             "n_startup_trials": 2, "n_warmup_steps": 0})
    for _ in range(2):
        done = study.ask()
        done.report(1.0, 10)
        study.tell(done, 1.0)
    study.ask()
    study.ask()
    worse, better = make_reporter(_link(storage, 2)), make_reporter(_link(storage, 3))
    assert worse.report(10, 5.0) is True
    assert better.report(10, 0.5) is False


def test_a_finished_trial_is_left_alone(storage, caplog):
    study = _study(storage, {"_target_": "optuna.pruners.ThresholdPruner", "upper": 0.5})
    study.tell(study.ask(), 1.0)
    reporter = make_reporter(_link(storage, 0))  # a finished trial's overrides, run again
    assert reporter.in_study is False and reporter.report(5, 9.0) is False
    assert "already COMPLETE" in caplog.text
    assert h.load_study(storage, "s").trials[0].intermediate_values == {}


def test_no_stored_spec_means_no_pruning(storage):
    _study(storage).ask()
    assert make_reporter(_link(storage, 0)).report(1, 1e12) is False


def test_unknown_study_is_an_error(tmp_path):
    with pytest.raises(KeyError):
        make_reporter(_link(f"sqlite:///{tmp_path}/none.db", 0, name="missing"))


def test_build_pruner_passes_kwargs():
    pruner = build_pruner({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 7})
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert pruner._n_startup_trials == 7
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://bob:s3cret@db:5432/x", "postgresql+psycopg2://bob:***@db:5432/x"),
    ("postgresql://bob@db/x", "postgresql://bob@db/x"),
    ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
    ("journal:/tmp/a.log", "journal:/tmp/a.log"),
])
def test_display_url_masks_passwords(url, shown):
    assert display_url(url) == shown
