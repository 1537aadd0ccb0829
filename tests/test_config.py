"""Composition of every config option, the schema's refusals, and DESIGN §3's bad-input contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scu_sweep.config import ConfigError
from scu_sweep.validation import validate

from conftest import CONF, cli, compose_cfg

GROUPS = ["model", "data", "prior", "controller", "saturation", "train", "lora", "logger", "experiment"]


def options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


EXTRA = {("data", "text_files"): ["data.paths=[corpus.txt]"]}  # the one option with a required key


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}", *EXTRA.get((group, option), [])])
    validate(cfg)
    assert 0 < cfg.target_s < 1


def test_controller_seed_is_design_s_seed_law_and_the_seed_experiment_uses_it():
    for c in (compose_cfg(["controller=seed"]).controller, compose_cfg(["experiment=seed_olmo3_7b"]).controller):
        assert (c.law, c.error, c.smooth, c.control_every) == ("incremental", "absolute", "s", 50)
        assert (c.kp, c.ki, c.deadband, c.ema_alpha, c.leak, c.i_min, c.i_max, c.lambda_init, c.lambda_min,
                c.lambda_max) == (0.8, 0.15, 0.002, 0.1, 0.995, -0.2, 0.2, 1.0, 1e-4, 10.0)
    default = compose_cfg([]).controller
    assert (default.law, default.error) == ("positional", "relative")


def test_prior_sigma_travels_with_the_model():
    assert compose_cfg(["model=tiny"]).prior.sigma == 0.012
    assert compose_cfg([]).prior.sigma == 0.68
    assert compose_cfg(["experiment=seed_olmo3_7b"]).prior.sigma == 0.01
    assert compose_cfg(["model=tiny", "prior.sigma=0.5"]).prior.sigma == 0.5


def test_the_corpus_budget_travels_with_the_model():
    """python_docs takes the model config's budget (SmolLM2: the main job's 14k tokens); any value overrides it."""
    assert compose_cfg([]).data.max_tokens == 14000
    assert compose_cfg(["model=tiny"]).data.max_tokens is None
    assert compose_cfg(["data.max_tokens=null"]).data.max_tokens is None
    assert compose_cfg(["model.data_tokens=5000"]).data.max_tokens == 5000
    assert compose_cfg(["data=text_files"]).data.max_tokens is None  # user files: all of them


def test_unknown_key_and_wrong_type_fail_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["controller.kpp=1.0"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["train.steps=many"])


@pytest.mark.parametrize("override,key", [
    ("target_s=1.5", "target_s"), ("target_s=0", "target_s"), ("prior.sigma=0", "prior.sigma"),
    ("prior.sigma=-1", "prior.sigma"), ("controller.kp=-0.1", "controller.kp"), ("controller.ki=-1", "controller.ki"),
    ("controller.lambda_min=0", "controller.lambda_min"), ("train.steps=0", "train.steps"),
    ("lora.rank=0", "lora.rank"), ("data.val_fraction=1.0", "data.val_fraction"), ("logger.mode=cloud", "logger.mode"),
    ("target_s=nan", "target_s"),
])
def test_validate_names_the_key_on_one_line(override, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg([override]))
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "allowed" in msg and "\n" not in msg


def test_validate_lists_every_offender_at_once():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["target_s=2", "prior.sigma=0"]))
    assert "target_s=" in str(e.value) and "prior.sigma=" in str(e.value)


def _assert_clean_failure(proc, key, run_dir: Path, reason="bad_input"):
    assert proc.returncode == (2 if reason == "bad_input" else 1)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("scu_sweep: error:")]
    assert len(errors) == 1 and key in errors[0] and "allowed" in errors[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "summary.json").exists()
    if (run_dir / "failure.json").exists():  # the reason, never null
        assert json.loads((run_dir / "failure.json").read_text())["stop_reason"] == reason


@pytest.mark.parametrize("override,key", [
    ("target_s=1.5", "target_s"), ("prior.sigma=0", "prior.sigma"), ("controller.kp=-1", "controller.kp"),
    ("model.path=/no/such/model", "model.path"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, override, key):
    proc = cli(["model=tiny", "logger=none", override, f"hydra.run.dir={tmp_path}"])
    _assert_clean_failure(proc, key, tmp_path)


MODELS = ", ".join(sorted(p.stem for p in (Path(CONF) / "model").glob("*.yaml")))


@pytest.mark.parametrize("args,key,options", [
    (["model=nosuch"], "model=nosuch", MODELS),
    (["-m", "model=tiny,nosuch"], "model=nosuch", MODELS),  # inside a sweep, before any job runs
    (["hydra/sweeper/pruner=nosuch"], "hydra/sweeper/pruner=nosuch",
     "hyperband, median, median_early, none, successive_halving"),  # the plugin's and conf/'s
])
def test_an_unknown_group_choice_is_one_line_naming_the_options(tmp_path, args, key, options):
    proc = cli([*args, "logger=none", f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"])
    _assert_clean_failure(proc, key, tmp_path)
    assert proc.stderr.strip().endswith(f"allowed one of {options}") and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,line", [
    (["target_s=abc"], "target_s=abc: Value 'abc' of type 'str' could not be converted to Float"),
    (["-m", "train.steps=10,ten"], "train.steps=ten: Value 'ten' of type 'str' could not be converted to Integer"),
    (["prior.sigma=null"], "prior.sigma=null: field 'prior.sigma' is not Optional"),
    (["nosuchkey=1"], "nosuchkey=1: no such key; allowed the keys of the composed config"),
    (["model=tiny", "lora.nosuch=1"], "lora.nosuch=1: no such key"),
])
def test_a_wrong_key_or_type_is_one_line_before_anything_runs(tmp_path, args, line):
    proc = cli([*args, "logger=none", f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"])
    _assert_clean_failure(proc, line.split(":")[0], tmp_path)
    assert f"scu_sweep: error: {line}" in proc.stderr and not list(tmp_path.iterdir())


def test_cli_missing_data_file(tmp_path):
    proc = cli(["model=tiny", "logger=none", "data=text_files", "data.paths=[/no/such.txt]", f"hydra.run.dir={tmp_path}"])
    _assert_clean_failure(proc, "data.paths", tmp_path)


def test_cli_corpus_shorter_than_a_sequence(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short to fill two blocks\n")
    run_dir = tmp_path / "run"
    proc = cli(["model=tiny", "logger=none", "data=text_files", f"data.paths=[{short}]", f"hydra.run.dir={run_dir}"])
    _assert_clean_failure(proc, f"data.paths=[{str(short)!r}]", run_dir)


def test_cli_non_finite_loss(tmp_path):
    proc = cli(["model=tiny", "logger=none", "train.lr=1e30", "train.steps=20", f"hydra.run.dir={tmp_path}"])
    _assert_clean_failure(proc, "train.lr", tmp_path, reason="diverged")
    assert (tmp_path / "failure.json").is_file()


def test_a_failing_job_does_not_take_the_multirun_down(tmp_path):
    proc = cli(["-m", "model=tiny", "logger=none", "train.steps=5", "target_s=0.03,1.5", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert (tmp_path / "0" / "summary.json").is_file()
    assert not (tmp_path / "1" / "summary.json").exists()
    assert json.loads((tmp_path / "1" / "failure.json").read_text())["stop_reason"] == "bad_input"
    assert (tmp_path / "sweep_summary.csv").read_text().count("\n") == 3  # header + 2 jobs


def test_a_sweep_whose_every_job_failed_exits_1_with_its_report(tmp_path):
    proc = cli(["-m", "model=tiny", "logger=none", "target_s=1.5,2.0", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("scu_sweep: error: all 2 jobs of the sweep failed")
    assert (tmp_path / "sweep_summary.csv").read_text().count(",failed,") == 2


def test_an_optuna_study_stopped_by_its_failures_exits_1_with_its_report(tmp_path):
    """hydra.sweeper.max_failure_rate ends the study; the report is still written, one line says why."""
    proc = cli(["model=tiny", "logger=none", "hydra/sweeper=optuna", "hydra/sweeper/pruner=none",
                "train.steps=10", "train.lr=1e6", "hydra.sweeper.n_trials=2", "controller.kp=interval(1,2)",
                f"hydra.sweep.dir={tmp_path}", "-m"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("scu_sweep: error: 2 of 2 trials failed") and "max_failure_rate=0.5" in last
    assert (tmp_path / "sweep_summary.csv").read_text().count(",failed,") == 2
    assert OmegaConf.load(tmp_path / "optimization_results.yaml").trials.fail == 2


def test_structured_schema_types():
    cfg = compose_cfg([])
    assert OmegaConf.get_type(cfg.controller).__name__ == "ControllerConfig"


@pytest.mark.parametrize("group", ["prior", "controller", "saturation", "train", "lora"])
def test_default_yaml_and_schema_hold_the_same_numbers(group):
    """One home per default: conf/<group>/default.yaml may only restate the schema's values."""
    from scu_sweep.config import SCUConfig

    yaml_values = OmegaConf.to_container(OmegaConf.load(Path(CONF) / group / "default.yaml"))
    schema = OmegaConf.to_container(OmegaConf.structured(SCUConfig)[group])
    assert yaml_values == {k: schema[k] for k in yaml_values}


def test_cli_seq_len_beyond_the_model_context(tmp_path):
    proc = cli(["model=tiny", "logger=none", "train.seq_len=1024", f"hydra.run.dir={tmp_path}"])  # tiny: 512
    _assert_clean_failure(proc, "train.seq_len", tmp_path)


def test_pure_modules_import_only_the_standard_library():
    """Every module of the pure core (scu_sweep/scu/), and records, redact, paths and pruning,
    must load with MLX, Optuna, wandb and Hydra absent."""
    import subprocess
    import sys

    core = sorted(f"scu_sweep.scu.{p.stem}" for p in (Path(CONF).parent / "scu_sweep" / "scu").glob("*.py")
                  if p.stem != "__init__")
    assert {"scu_sweep.scu.mdl", "scu_sweep.scu.controller", "scu_sweep.scu.saturation"} <= set(core)
    modules = [*core, "scu_sweep.records", "scu_sweep.redact", "scu_sweep.paths", "scu_sweep.sweeps.pruning"]
    code = ("import sys\n"
            "for m in ('mlx', 'mlx.core', 'optuna', 'wandb', 'hydra', 'omegaconf', 'numpy'): sys.modules[m] = None\n"
            f"import {', '.join(modules)}\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(CONF).parent)
    assert proc.stdout.strip() == "ok", proc.stderr[-1500:]
