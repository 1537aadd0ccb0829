"""The multirun launcher (hydra_plugins/scu_launcher, ``hydra/launcher=workers``): jobs in
spawned worker processes; a worker that dies fails only its job; Ctrl-C leaves no worker.

The slow tests run real sweeps of ``python -m scu_sweep`` (model=tiny) in subprocesses.
A job dies for real: the sweep runs under an address-space limit (RLIMIT_AS, inherited
by its workers) that one job's batch far exceeds, so an allocation fails in that worker
and it dies (MLX segfaults, or OpenBLAS gives up and exits).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite, LauncherTestSuite

from conftest import ROOT, compose_cfg

TINY = ["model=tiny", "logger=none", "train.seq_len=512",
        "model.tiny.max_position_embeddings=1024"]
TARGET = "hydra_plugins.scu_launcher.scu_launcher.ScuWorkersLauncher"
AS_LIMIT = 3_000_000 * 1024  # bytes; `ulimit -v 3000000`: small tiny-model jobs fit, batch 4096 does not
HUGE_BATCH = 4096  # 4096 x 512 tokens: the logits alone are over 2 GB

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


# ---------------------------------------------------------------- config and pieces


def compose_cfg_hydra(overrides):
    """The real config with its ``hydra`` node."""
    from hydra import compose, initialize_config_dir

    compose_cfg([])  # registers the schema
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.usefixtures("hydra_restore_singletons")
def test_default_launcher_is_ours_one_job_per_core():
    from joblib.externals.loky import cpu_count

    from hydra_plugins.scu_launcher._core import n_slots

    cfg = compose_cfg_hydra([])
    assert cfg.hydra.launcher._target_ == TARGET
    assert cfg.hydra.launcher.n_jobs == -1
    assert n_slots(-1) == cpu_count() and n_slots(-2) == max(cpu_count() - 1, 1) and n_slots(3) == 3


def test_a_batch_between_one_and_two_per_core_runs_at_once(monkeypatch):
    """No lone last round: 3 jobs on 2 cores run 3 at a time; 2, 4 or 7 take one slot per core."""
    from hydra_plugins.scu_launcher import _core

    monkeypatch.setattr(_core, "cpu_count", lambda: 2)
    assert [_core.n_slots(-1, n) for n in (1, 2, 3, 4, 7)] == [2, 2, 3, 2, 2]
    assert _core.n_slots(-2, 3) == 1 and _core.n_slots(2, 3) == 2  # only the default widens


@pytest.mark.usefixtures("hydra_restore_singletons")
def test_workers_preset_follows_the_optuna_sweepers_n_jobs():
    cfg = compose_cfg_hydra(["hydra/sweeper=optuna", "hydra.sweeper.n_jobs=3"])
    assert cfg.hydra.launcher._target_ == TARGET and cfg.hydra.launcher.n_jobs == 3
    cfg = compose_cfg_hydra(["hydra/launcher=scu_workers", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_ == TARGET and cfg.hydra.launcher.n_jobs == 2


def test_launcher_is_discovered_and_rejects_zero_jobs():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    from hydra_plugins.scu_launcher.scu_launcher import ScuWorkersLauncher

    assert TARGET in {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    with pytest.raises(ValueError, match="hydra.launcher.n_jobs=0"):
        ScuWorkersLauncher(n_jobs=0)
    assert ScuWorkersLauncher(n_jobs=2).joblib == {"n_jobs": 2}  # what the optuna sweeper reads


def test_dead_worker_return_is_failed_but_does_not_raise():
    """Hydra's BasicSweeper reads every return value; a FAILED one re-raises its error."""
    from hydra.core.utils import JobStatus

    from hydra_plugins.scu_launcher._failures import DeadWorkerReturn, WorkerDied

    ret = DeadWorkerReturn(status=JobStatus.FAILED, _return_value=WorkerDied("died of SIGKILL"))
    assert ret.status == JobStatus.FAILED and math.isnan(ret.return_value)
    assert isinstance(ret._return_value, WorkerDied)


@pytest.mark.parametrize("code, words", [(-9, "123 died of SIGKILL: out of memory?"),
                                         (-11, "123 died of SIGSEGV: out of memory?"),
                                         (1, "123 exited with code 1 mid-job: out of memory?"),
                                         (None, "died (exit status unknown): out of memory?")])
def test_death_message_is_one_line(code, words):
    from hydra_plugins.scu_launcher._failures import death

    msg = death([SimpleNamespace(pid=123, exitcode=code)])
    assert words in msg and "\n" not in msg


@pytest.mark.usefixtures("hydra_restore_singletons")
def test_a_job_killed_by_sigkill_fails_alone(hydra_sweep_runner, tmpdir):
    """An in-process sweep (Hydra's test app) whose job 1 gets what the OOM killer sends."""

    def task(cfg):
        if cfg.a == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return cfg.a

    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=task, config_path="configs", config_name="compose",
                               overrides=["hydra/launcher=scu_workers", "hydra.launcher.n_jobs=2",
                                          "+a=0,1,2"], temp_dir=tmpdir)
    with sweep:  # Hydra's BasicSweeper read every return value and did not raise
        rets, sweep_dir = sweep.returns[0], Path(sweep.temp_dir)
        assert [r.status.name for r in rets] == ["COMPLETED", "FAILED", "COMPLETED"]
        assert [rets[0].return_value, rets[2].return_value] == [0, 2]
        assert math.isnan(rets[1].return_value)
        dead = rets[1]
        assert dead.overrides == ["+a=1"] and dead.cfg.a == 1 and dead.hydra_cfg.hydra.job.num == 1
        assert Path(dead.hydra_cfg.hydra.runtime.output_dir) == sweep_dir / "1"
        failure = json.loads((sweep_dir / "1" / "failure.json").read_text())
        assert failure["stop_reason"] == "killed"
        assert "died of SIGKILL: out of memory?" in failure["error"]
        assert not (sweep_dir / "0" / "failure.json").exists()


# ---------------------------------------------------------------- real sweeps


def _env(tag: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["SCU_TEST_TAG"] = tag  # inherited by every process of that sweep: how the test finds them
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _start(args, tmp_path: Path, tag: str, cmd=None, limit_memory=False) -> subprocess.Popen:
    """The sweep in a process group of its own, with SIGINT handled as in a terminal (a
    shell running pytest in the background would pass it on ignored)."""

    def preexec():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_memory:
            resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1]))

    log = open(tmp_path / "sweep.log", "w")
    return subprocess.Popen([*(cmd or [sys.executable, "-m", "scu_sweep"]), *args], cwd=tmp_path,
                            env=_env(tag), stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=preexec, start_new_session=True)


def _tagged(tag: str) -> dict:
    """{pid: cmdline} of live processes (not zombies) whose environment carries ``tag``."""
    found, needle = {}, f"SCU_TEST_TAG={tag}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours
            continue
    return found


def _worker_env(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


def _wait_for(pred, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _log(tmp_path: Path) -> str:
    return (tmp_path / "sweep.log").read_text()[-4000:]


def _csv(sweep: Path) -> dict:
    with open(sweep / "sweep_summary.csv") as f:
        return {int(r["job"]): r for r in csv.DictReader(f)}


@needs_proc
@pytest.mark.slow
def test_a_killed_worker_fails_only_its_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _start(["-m", *TINY, "train.steps=5", f"train.batch_size=2,{HUGE_BATCH},4",
                   "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
                  tmp_path, uuid.uuid4().hex, limit_memory=True)
    assert proc.wait(timeout=600) == 0, _log(tmp_path)
    for job in (0, 2):
        assert json.loads((sweep / str(job) / "summary.json").read_text())["steps_run"] == 5
        assert not (sweep / str(job) / "failure.json").exists()
    failure = json.loads((sweep / "1" / "failure.json").read_text())
    assert failure["stop_reason"] == "killed", failure
    # how it dies varies: MLX segfaults, or OpenBLAS gives up and exits 1
    assert re.search(r"worker process \d+ (died of SIG[A-Z]+|exited with code \d+ mid-job): out of "
                     r"memory\?", failure["error"]), failure
    assert not (sweep / "1" / "summary.json").exists()
    rows = _csv(sweep)
    assert sorted(rows) == [0, 1, 2]
    assert [rows[j]["state"] for j in (0, 1, 2)] == ["ok", "failed", "ok"]
    assert rows[1]["stop_reason"] == "killed" and f"train.batch_size={HUGE_BATCH}" in rows[1]["overrides"]
    assert "#1 failed: the job's worker process" in _log(tmp_path)


@needs_proc
@pytest.mark.slow
def test_a_killed_trial_fails_only_itself_in_an_optuna_sweep(tmp_path):
    """The optuna sweeper launches one-job batches from 2 threads at once; the killed trial
    is FAIL, the others complete, the sweep exits 0."""
    sweep = tmp_path / "sweep"
    proc = _start(["-m", *TINY, "train.steps=5", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                   f"train.batch_size=choice(2,{HUGE_BATCH},4)", "hydra.sweeper.n_jobs=2",
                   "hydra.sweeper.n_trials=3", "hydra.sweeper.max_failure_rate=0.5",
                   f"hydra.sweep.dir={sweep}"],
                  tmp_path, uuid.uuid4().hex, limit_memory=True)
    assert proc.wait(timeout=600) == 0, _log(tmp_path)
    trials = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/trial.json")}
    assert sorted(trials) == [0, 1, 2]
    for job, trial in trials.items():
        huge = trial["params"]["train.batch_size"] == HUGE_BATCH
        assert trial["state"] == ("FAIL" if huge else "COMPLETE"), trial
        assert (sweep / str(job) / ("failure.json" if huge else "summary.json")).exists()
        if huge:
            assert json.loads((sweep / str(job) / "failure.json").read_text())["stop_reason"] == "killed"
    assert len(_csv(sweep)) == 3


def _interrupt(tmp_path, group: bool, args, cmd=None, started=None, one_blas_thread=True,
               sig=signal.SIGINT, children="popen_loky_posix"):
    """Start a sweep, wait until 2 workers run jobs, send ``sig``; return (pids, seconds to clean)."""
    tag = uuid.uuid4().hex
    proc = _start(args, tmp_path, tag, cmd=cmd)
    try:
        def workers():
            found = {p: c for p, c in _tagged(tag).items() if children in c}
            return found if len(found) == 2 and (started is None or started()) else None

        found = _wait_for(workers, 300, "two running workers", proc)
        assert proc.poll() is None, _log(tmp_path)
        for pid in found if one_blas_thread else ():  # set by callbacks.py before the pool starts
            assert _worker_env(pid).get("OPENBLAS_NUM_THREADS") == "1"
        if children == "popen_loky_posix":  # the launcher's start_worker, once the worker has run it
            _wait_for(lambda: all(os.sched_getscheduler(pid) == os.SCHED_BATCH for pid in found), 30,
                      "workers in SCHED_BATCH")
        t0 = time.monotonic()
        if group:
            os.killpg(proc.pid, sig)  # Ctrl-C in a terminal
        else:
            os.kill(proc.pid, sig)  # the sweep process alone
        proc.wait(timeout=60)
        _wait_for(lambda: not _tagged(tag), 10, f"no process left; left: {_tagged(tag)}")
        return found, time.monotonic() - t0
    finally:
        for pid in _tagged(tag):  # clean up after a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("group", [True, False], ids=["process_group", "sweep_process"])
def test_ctrl_c_leaves_no_worker(tmp_path, group):
    sweep = tmp_path / "sweep"

    def training():  # both jobs past their first step
        return all((sweep / j / "metrics.jsonl").exists() for j in ("0", "1"))

    found, took = _interrupt(tmp_path, group, ["-m", *TINY, "train.steps=100000", "train.eval_every=100000",
                                               "train.batch_size=2", "target_s=0.02,0.03,0.05",
                                               "hydra.launcher.n_jobs=2",  # two in flight, a third waiting
                                               f"hydra.sweep.dir={sweep}"], started=training)
    assert len(found) == 2 and took < 15
    assert not any((sweep / j / "summary.json").exists() for j in ("0", "1", "2"))


@needs_proc
@pytest.mark.slow
def test_a_sigkilled_sweep_leaves_no_worker_and_resumes(tmp_path):
    """SIGKILL runs no cleanup in the sweep process: its workers notice their parent is
    gone and kill themselves (scu_sweep.sweeps.lifeline); they used to train on as orphans. The
    same command then continues both jobs from their checkpoints."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "train.steps=200", "train.eval_every=100000", "train.checkpoint_every=5",
            "train.batch_size=2", "saturation.enabled=false", "target_s=0.02,0.03",
            f"hydra.sweep.dir={sweep}"]

    def checkpointed():
        return all((sweep / j / "checkpoints" / "latest.json").exists() for j in ("0", "1"))

    found, took = _interrupt(tmp_path, False, args, started=checkpointed, sig=signal.SIGKILL)
    assert len(found) == 2 and took < 10
    assert not any((sweep / j / "summary.json").exists() for j in ("0", "1"))
    proc = _start(args, tmp_path, uuid.uuid4().hex)
    assert proc.wait(timeout=600) == 0, _log(tmp_path)
    for j in ("0", "1"):
        summary = json.loads((sweep / j / "summary.json").read_text())
        assert summary["steps_run"] == 200 and summary["resumed_from_step"] > 0, summary


@needs_proc
@pytest.mark.slow
def test_a_sigkilled_run_leaves_no_rank(tmp_path):
    """train.ranks=2: the ranks die with the job process that started them."""
    run = tmp_path / "run"
    found, took = _interrupt(
        tmp_path, False, [*TINY, "train.steps=100000", "train.eval_every=100000", "train.ranks=2",
                          "saturation.enabled=false", "train.batch_size=2", f"hydra.run.dir={run}"],
        started=lambda: (run / "metrics.jsonl").exists(), sig=signal.SIGKILL,
        children="scu_sweep.ranks")
    assert len(found) == 2 and took < 10


@needs_proc
@pytest.mark.slow
def test_ctrl_c_in_an_optuna_sweep_leaves_no_worker(tmp_path):
    """The optuna sweeper waits in its main thread while its slot threads launch: the
    workers are killed as the interpreter exits. Its tiny test app sleeps through its steps."""
    app = ROOT / "tests" / "sweeper_app" / "app.py"
    sweep = tmp_path / "sweep"
    found, took = _interrupt(
        tmp_path, False,
        ["-m", "hydra/sweeper=optuna", "hydra/launcher=scu_workers", "hydra.launcher.n_jobs=2",
         "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4", "steps=1000", "step_s=0.05",
         f"hydra.sweep.dir={sweep}"],
        cmd=[sys.executable, str(app)], one_blas_thread=False)  # the app has no scu_sweep callbacks
    assert len(found) == 2 and took < 15
    # the interrupted trials are not told FAIL: a restart of the sweep re-queues them
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]


# ---------------------------------------------------------------- Hydra's own launcher suites

# The suites expect Hydra's legacy default (jobs chdir to their dir); other tests' compose
# calls leave version_base=1.3 in Hydra's global state, so ask for it.
SUITE_OVERRIDES = ["hydra.launcher.n_jobs=2", "hydra.job.chdir=true"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name, overrides", [("scu_workers", SUITE_OVERRIDES)])
class TestHydraLauncherSuite(LauncherTestSuite):
    """Job dirs, numbers, overrides and configs as Hydra's launchers give them (in-process
    sweeps of a closure, run in spawned workers)."""


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name, overrides",
                         [("scu_workers", ["hydra.sweeper.max_batch_size=2", *SUITE_OVERRIDES])])
class TestHydraBatchedSweeperSuite(BatchedSweeperTestSuite):
    """Three batches of 2: three launches, the workers stopped after each, started again."""
