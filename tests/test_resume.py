"""Resume after a kill (train.resume=auto): runs, multiruns and Optuna studies; files left by kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scu_sweep.sweeps import resume
from scu_sweep.records import read_jsonl

from conftest import ROOT, compose_cfg

TINY = ["model=tiny", "logger=none", "saturation.enabled=false", "lora.dropout=0.1"]
COMPARED = ("loss", "data_bpt", "param_bpt", "s_ratio", "s_ema", "lambda", "integral", "lr", "val_loss")


def start(args, cwd: Path, log: str = "log") -> subprocess.Popen:
    """``python -m scu_sweep ARGS`` in its own process group (so a kill reaches its workers)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = open(cwd / log, "a")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "scu_sweep", *args], cwd=cwd, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(args, cwd: Path) -> str:
    proc = start(args, cwd)
    assert proc.wait(timeout=600) == 0, (cwd / "log").read_text()[-3000:]
    return (cwd / "log").read_text()


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(proc: subprocess.Popen, cwd: Path, *patterns: str, timeout: float = 300) -> None:
    """Until each glob pattern matches something under ``cwd`` (the process still running)."""
    deadline = time.time() + timeout
    while not all(list(cwd.glob(p)) for p in patterns):
        assert time.time() < deadline and proc.poll() is None, (cwd / "log").read_text()[-2000:]
        time.sleep(0.05)


def only(pattern: str, cwd: Path) -> Path:
    found = sorted(cwd.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def resumable(cwd: Path) -> list:
    """The run dirs under ``cwd`` a restart can pick: those whose ``.hydra/overrides.yaml`` got
    written (a kill in the milliseconds between Hydra making a dir and writing it leaves a bare
    dir behind, which the next start rightly passes over)."""
    return sorted(p.parent.parent for p in cwd.glob("outputs/runs/*/*/.hydra/overrides.yaml"))


def metric_rows(cwd: Path) -> int:
    """Lines written to the metrics of the (one) run under ``cwd`` so far."""
    return sum(p.read_bytes().count(b"\n") for p in cwd.glob("outputs/runs/*/*/metrics.jsonl"))


def check_files_parse(run_dir: Path) -> int:
    """Every file a kill can leave is whole; returns how many were checked."""
    import mlx.core as mx

    checked = 0
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        rows = read_jsonl(metrics)
        assert len(rows) >= len(lines) - 1  # at most a torn last line, which readers skip
        assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
        checked += 1
    for name in ("summary.json", "failure.json", "checkpoints/latest.json"):
        if (run_dir / name).exists():
            json.loads((run_dir / name).read_text())
            checked += 1
    latest = run_dir / "checkpoints" / "latest.json"
    if latest.exists():
        d = run_dir / "checkpoints" / json.loads(latest.read_text())["dir"]
        json.loads((d / "state.json").read_text())
        assert mx.load(str(d / "arrays.safetensors"))
        checked += 2
    for f in (run_dir / "adapters").glob("*.safetensors"):
        assert mx.load(str(f))
        checked += 1
    return checked


# -- the pure half


def test_fingerprint_ignores_logging_and_resume_keys_only():
    base = resume.fingerprint(compose_cfg(TINY))
    assert base == resume.fingerprint(compose_cfg(TINY + ["logger=wandb", "train.resume=never",
                                                          "train.checkpoint_every=3"]))
    assert base != resume.fingerprint(compose_cfg(TINY + ["train.lr=1e-3"]))
    assert base != resume.fingerprint(compose_cfg(TINY + ["target_s=0.05"]))


def test_command_overrides_reads_the_task_overrides_and_resume_flag():
    task, flag = resume.command_overrides(["-m", "target_s=0.02,0.05", "hydra.launcher.n_jobs=1",
                                           "train.resume=never"])
    assert task == ["target_s=0.02,0.05", "train.resume=never"] and flag == "never"
    assert resume.command_overrides(["model=tiny"]) == (["model=tiny"], "auto")


def _fake_run(root: Path, name: str, overrides, ended=None) -> Path:
    d = root / "2026-01-01" / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if ended:
        (d / ended).write_text("{}")
    return d


def test_resume_dir_picks_the_newest_unfinished_unlocked_run_of_the_same_command(tmp_path):
    root = tmp_path / "runs"
    same = ["model=tiny", "target_s=0.05"]
    older = _fake_run(root, "10-00-00", same)
    newer = _fake_run(root, "11-00-00", list(reversed(same)))  # order does not matter
    _fake_run(root, "12-00-00", same, ended="summary.json")
    _fake_run(root, "13-00-00", same, ended="failure.json")
    _fake_run(root, "14-00-00", ["model=tiny"])
    pick = lambda: resume.resume_dir("run", str(root), "new/dir", same, "auto")  # noqa: E731
    assert pick() == str(newer)
    held = subprocess.Popen([sys.executable, "-c", "import sys, time; from scu_sweep.sweeps.resume import DirLock; "
                             f"DirLock({str(newer)!r}); print('held', flush=True); time.sleep(60)"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        assert pick() == str(older)  # the live one is skipped
    finally:
        held.kill()
        held.wait()
    assert pick() == str(newer)  # its process is gone: resumable again
    assert resume.resume_dir("run", str(root), "new/dir", same, "never") == str(root / "new/dir")
    assert resume.resume_dir("run", str(root), "new/dir", ["x=1"], "auto") == str(root / "new/dir")


# -- runs killed with SIGKILL


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_uninterrupted_metrics(tmp_path):
    """Six SIGKILLs at random moments (model load, training, checkpoint writes, ...): every
    file left parses, and the resumed run's metrics equal the uninterrupted run's exactly
    (fp32 state restored bit for bit, batch order and dropout masks a function of the step,
    the same BLAS thread count: the same operations in the same order)."""
    args = TINY + ["train.steps=400", "train.checkpoint_every=7", "train.eval_every=50"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    finish(args, ref)
    rng, checked = random.Random(0), 0
    for i in range(6):
        before = metric_rows(cut)
        proc = start(args, cut)
        # Every other kill lands in training or a checkpoint write (after 1-30 new rows, however
        # slow the load); the rest at 0.5-4 s (mostly the load). Counting rows, not seconds, keeps
        # six kills short of the run's 400 steps on a machine of any speed.
        seconds = 300 if i % 2 else rng.uniform(0.5, 4.0)
        rows = rng.randint(1, 30)
        deadline = time.monotonic() + seconds
        while proc.poll() is None and time.monotonic() < deadline and metric_rows(cut) - before < rows:
            time.sleep(0.02)
        assert proc.poll() is None, (cut / "log").read_text()[-3000:]
        kill_group(proc)
        assert len(resumable(cut)) <= 1, resumable(cut)  # every restart found the same dir
        checked += sum(check_files_parse(d) for d in cut.glob("outputs/runs/*/*"))
    assert checked > 0
    finish(args, cut)
    (run_dir,) = resumable(cut)
    want = read_jsonl(only("outputs/runs/*/*/metrics.jsonl", ref))
    got = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 401))
    for a, b in zip(want, got):
        assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}, a["step"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "resuming from the checkpoint of step" in (cut / "log").read_text()
    assert summary["final"] == json.loads(only("outputs/runs/*/*/summary.json", ref).read_text())["final"]
    assert not (run_dir / "checkpoints").exists()  # dropped once the result is written
    check_files_parse(run_dir)


@pytest.mark.slow
def test_resume_never_starts_a_new_dir_and_a_live_dir_is_refused(tmp_path):
    args = TINY + ["train.steps=200", "train.checkpoint_every=5"]
    proc = start(args, tmp_path)
    wait_for(proc, tmp_path, "outputs/runs/*/*/checkpoints/latest.json")
    os.killpg(proc.pid, signal.SIGSTOP)  # held, lock and all, however fast it would have finished
    run_dir = only("outputs/runs/*/*", tmp_path)
    second = subprocess.run([sys.executable, "-m", "scu_sweep", *args, f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "another live run" in second.stderr
    kill_group(proc)
    time.sleep(1.1)  # a new second for the timestamped dir
    finish(args + ["train.resume=never"], tmp_path)
    assert len(list(tmp_path.glob("outputs/runs/*/*"))) == 2
    assert not (run_dir / "summary.json").exists()


# -- sweeps killed with SIGKILL


@pytest.mark.slow
def test_a_killed_multirun_finishes_what_is_missing_and_keeps_what_finished(tmp_path):
    args = ["-m", *TINY, "train.steps=300", "train.checkpoint_every=10", "target_s=0.02,0.03,0.05,0.07"]
    proc = start(args, tmp_path)
    wait_for(proc, tmp_path, "outputs/multirun/*/*/*/summary.json", "outputs/multirun/*/*/*/checkpoints/latest.json")
    kill_group(proc)
    sweep = only("outputs/multirun/*/*", tmp_path)
    before = {p.parent.name: p.read_text() for p in sweep.glob("*/summary.json")}
    assert 1 <= len(before) < 4 and not (sweep / "sweep_summary.csv").exists()
    for d in sweep.glob("[0-9]*"):
        check_files_parse(d)
    time.sleep(1.1)
    log = finish(args, tmp_path)
    assert only("outputs/multirun/*/*", tmp_path) == sweep
    for job, text in before.items():  # finished jobs were not run again
        assert (sweep / job / "summary.json").read_text() == text
        assert f"{job}: already finished" in log
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4 and all(s["steps_run"] == 300 for s in summaries)
    assert any(s["resumed_from_step"] for s in summaries)
    assert len((sweep / "sweep_summary.csv").read_text().strip().splitlines()) == 5


@pytest.mark.slow
def test_a_killed_optuna_study_requeues_its_interrupted_trials(tmp_path):
    import optuna

    args = ["experiment=optuna_tiny_kp_ki", "hydra/sweeper/pruner=none", "hydra.sweeper.n_trials=5",
            "train.steps=300", "train.checkpoint_every=10"]
    proc = start(args, tmp_path)
    wait_for(proc, tmp_path, "outputs/multirun/*/*/*/trial.json", "outputs/multirun/*/*/*/checkpoints/latest.json")
    kill_group(proc)
    sweep = only("outputs/multirun/*/*", tmp_path)
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    interrupted = [t for t in optuna.load_study(study_name=name, storage=storage).trials
                   if t.state == optuna.trial.TrialState.RUNNING]
    assert interrupted
    time.sleep(1.1)
    finish(args, tmp_path)
    assert only("outputs/multirun/*/*", tmp_path) == sweep
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    marked = [t for t in trials if t.user_attrs.get("scu_sweep.interrupted")]
    assert {t.number for t in marked} == {t.number for t in interrupted}
    assert all(t.state == optuna.trial.TrialState.FAIL for t in marked)
    counted = [t for t in trials if not t.user_attrs.get("scu_sweep.interrupted")]
    assert len(counted) == 5 and all(t.state.is_finished() for t in counted)
    requeued = {t.user_attrs["scu_sweep.job_num"]: t for t in counted if "scu_sweep.job_num" in t.user_attrs}
    for t in marked:  # same parameters, continued in the interrupted trial's job dir
        if not t.params:  # killed between ask() and drawing its parameters: it never ran
            continue
        again = requeued[t.number].params
        if set(t.params) < set(again):  # killed between two draws: the drawn ones are kept, the rest drawn anew
            assert {k: again[k] for k in t.params} == t.params
        else:
            assert again == t.params
        assert json.loads((sweep / str(t.number) / "trial.json").read_text())["number"] == requeued[t.number].number


def test_a_restarted_study_marks_every_running_trial_of_its_own_storage(tmp_path):
    """A trial killed between ask() and its parameters has neither: it is marked and dropped;
    one with parameters is re-queued into its own job dir; n_trials counts finished trials."""
    import optuna

    import sweeper_helpers as h

    sweep = tmp_path / "sw"
    sweep.mkdir()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    bare = study.ask()  # no parameters, no sweep tag
    tagged = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    tagged.set_user_attr("scu_sweep.sweep_dir", str(sweep))
    h.run_app(sweep, "x=interval(0,1)", "hydra.sweeper.n_trials=3", "steps=2")
    trials = h.load_study(storage, "s").trials
    by_number = {t.number: t for t in trials}
    for t in (bare, tagged):
        assert by_number[t.number].state == optuna.trial.TrialState.FAIL
        assert by_number[t.number].user_attrs["scu_sweep.interrupted"] is True
    counted = [t for t in trials if not t.user_attrs.get("scu_sweep.interrupted")]
    assert len(counted) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    (again,) = [t for t in counted if t.user_attrs.get("scu_sweep.job_num") == tagged.number]
    assert again.params == tagged.params
    assert json.loads((sweep / str(tagged.number) / "trial.json").read_text())["number"] == again.number


def test_a_sweep_sharing_its_dir_leaves_a_live_workers_running_trial_alone(tmp_path):
    """launchers/local_workers.sh: two sweeps on one dir. The second one's start must not take
    the first's RUNNING trial for an interrupted one (it did: the first then crashed telling it);
    a RUNNING trial whose sweep process is gone is recovered."""
    import optuna

    import sweeper_helpers as h

    from scu_sweep.sweeps.pruning import open_storage

    sweep = tmp_path / "sw"
    sweep.mkdir()
    storage = f"journal:{sweep / 'optuna.journal'}"
    study = optuna.create_study(study_name="s", storage=open_storage(storage))
    live_proc = subprocess.Popen(["sleep", "60"])
    dead_proc = subprocess.Popen(["true"])
    dead_proc.wait()
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    live, dead = study.ask(x), study.ask(x)
    for t, p in ((live, live_proc), (dead, dead_proc)):
        t.set_user_attr("scu_sweep.sweep_dir", str(sweep))
        t.set_user_attr("scu_sweep.owner", resume.process_token(p.pid))
    try:
        h.run_app(sweep, "x=interval(0,1)", "hydra.sweeper.n_trials=2", "steps=2",
                  f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.study_name=s",
                  "hydra.sweeper.load_if_exists=true")
    finally:
        live_proc.kill()
        live_proc.wait()
    by_number = {t.number: t for t in h.load_study(storage, "s").trials}
    assert by_number[live.number].state == optuna.trial.TrialState.RUNNING
    assert "scu_sweep.interrupted" not in by_number[live.number].user_attrs
    assert by_number[dead.number].state == optuna.trial.TrialState.FAIL
    assert by_number[dead.number].user_attrs["scu_sweep.interrupted"] is True
    (again,) = [t for t in by_number.values() if t.user_attrs.get("scu_sweep.job_num") == dead.number]
    assert again.params == dead.params and again.state == optuna.trial.TrialState.COMPLETE


def test_process_token_names_a_live_process_and_not_a_reused_pid():
    me = resume.process_token()
    assert resume.token_alive(me) is True
    host, pid, start = me.rsplit(":", 2)
    if start:  # Linux: the same pid with another start time is another process
        assert resume.token_alive(f"{host}:{pid}:{int(start) + 1}") is False
    proc = subprocess.Popen(["true"])
    token = resume.process_token(proc.pid)
    proc.wait()
    assert resume.token_alive(token) is False
    assert resume.token_alive(f"another-host.invalid:{pid}:{start}") is None
