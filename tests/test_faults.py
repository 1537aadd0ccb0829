"""Faults end one run with a clear line and the right exit code: full disk, read-only disk, OOM."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from scu_sweep.records import StopReason, read_jsonl
from scu_sweep.run import DiskError, RunFailed, fault

from conftest import cli, compose_cfg

TINY = ["model=tiny", "logger=none"]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems under tmp_path (root only); unmounted afterwards."""
    mounted = []

    def mount(name: str, size: str, *options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = ",".join((f"size={size}",) + options)
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("scu_sweep: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_exit_1(tmpfs):
    disk = tmpfs("full", "96k")
    run_dir = disk / "run"
    proc = cli([*TINY, "train.steps=400", "train.checkpoint_every=5", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 1
    line = _error_line(proc.stderr)
    assert f"hydra.run.dir={run_dir}: disk full" in line and "allowed" in line
    assert not (run_dir / "summary.json").exists()
    rows = read_jsonl(run_dir / "metrics.jsonl")  # what was written is whole
    assert rows and [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows[-1]["step"] < 400


@pytest.mark.slow
@pytest.mark.parametrize("multirun", [False, True])
def test_a_read_only_output_dir_is_refused_before_anything_runs(tmpfs, multirun):
    disk = tmpfs("ro", "1m", "ro")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    proc = cli([*(["-m"] if multirun else []), *TINY, "train.steps=5", f"{key}={disk / 'out'}"])
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert line == f"scu_sweep: error: {key}={disk / 'out'}: not writable (Read-only file system); allowed a writable directory"


def _cfg():
    return compose_cfg(TINY + ["train.batch_size=8"])


@pytest.mark.parametrize("exc", [
    MemoryError(),
    RuntimeError("[metal::malloc] Attempting to allocate 9000000000 bytes which is greater than the maximum allowed buffer size"),
    RuntimeError("[cuda::malloc] out of memory"),
])
def test_out_of_memory_errors_name_the_batch_and_stop_reason(exc):
    err, reason = fault(exc, _cfg(), Path("/r"))
    assert isinstance(err, RunFailed) and reason == StopReason.OUT_OF_MEMORY
    assert str(err).startswith("train.batch_size=8: out of memory") and "allowed" in str(err)


def test_disk_faults_are_told_apart_and_other_errors_are_not_swallowed():
    full = OSError(errno.ENOSPC, "No space left on device", "/r/metrics.jsonl")
    assert fault(full, _cfg(), Path("/r"))[1] == StopReason.DISK_FULL
    mlx_full = RuntimeError("[write] Unable to write 1471 bytes to file.")
    assert fault(mlx_full, _cfg(), Path("/r"))[1] == StopReason.DISK_FULL
    err, reason = fault(OSError(errno.EROFS, "Read-only file system", "/r"), _cfg(), Path("/r"))
    assert isinstance(err, DiskError) and reason == StopReason.UNWRITABLE
    assert fault(RuntimeError("shape mismatch"), _cfg(), Path("/r")) is None
    assert fault(OSError(errno.ENOENT, "No such file"), _cfg(), Path("/r")) is None


@pytest.mark.slow
def test_a_diverged_job_fails_alone_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sw"
    proc = cli(["-m", *TINY, "train.steps=20", "train.lr=1e-3,1e9", "hydra/launcher=basic",
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((sweep / "0" / "summary.json").read_text())["steps_run"] >= 1
    assert json.loads((sweep / "1" / "failure.json").read_text())["stop_reason"] == "diverged"
    assert not (sweep / "1" / "summary.json").exists()
    assert len((sweep / "sweep_summary.csv").read_text().strip().splitlines()) == 3


def test_a_finite_blow_up_is_diverged_and_names_train_lr(tmp_path):
    """lr 1e6 on the tiny model: the loss explodes but may stay finite; the run must not end max_steps."""
    proc = cli([*TINY, "train.steps=30", "train.lr=1e6", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scu_sweep: error: train.lr=1000000.0:") and "exploded" in last + proc.stderr
    assert json.loads((tmp_path / "failure.json").read_text())["stop_reason"] == "diverged"
    assert not (tmp_path / "summary.json").exists()
