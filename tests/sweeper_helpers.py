"""Helpers for the sweeper tests: run the tiny app, read a study, a throwaway PostgreSQL."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "tests" / "sweeper_app"
APP = [sys.executable, str(APP_DIR / "app.py")]
PLUGIN_TARGET = "hydra_plugins.scu_optuna_sweeper.optuna_sweeper.OptunaSweeper"

if str(REPO) not in sys.path:  # the hydra_plugins namespace and scu_sweep from the checkout
    sys.path.insert(0, str(REPO))


def env() -> Dict[str, str]:
    """The environment of a sweep subprocess: checkout and app dir importable, 1 BLAS thread."""
    e = dict(os.environ)
    paths = [str(REPO), str(APP_DIR)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]
    e["PYTHONPATH"] = os.pathsep.join(paths)
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    e["HYDRA_FULL_ERROR"] = "1"
    return e


def sweep_args(sweep_dir: Path, *overrides: str) -> List[str]:
    return ["-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}", *overrides]


def run_app(sweep_dir: Path, *overrides: str, cmd: Optional[List[str]] = None,
            check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one sweep of the tiny app (or ``cmd``) in a subprocess; fail loudly on error."""
    proc = subprocess.run([*(cmd or APP), *sweep_args(sweep_dir, *overrides)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_sweeps(n: int, sweep_root: Path, *overrides: str) -> List[subprocess.Popen]:
    """Start ``n`` independent sweep processes of the tiny app at once."""
    procs = []
    for i in range(n):
        log = open(sweep_root / f"worker{i}.log", "w")
        procs.append(subprocess.Popen([*APP, *sweep_args(sweep_root / f"w{i}", *overrides)],
                                      cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: List[subprocess.Popen], sweep_root: Path, timeout: float = 300) -> None:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        assert rc == 0, (sweep_root / f"worker{i}.log").read_text()


def load_study(storage: str, name: str):
    import optuna

    from scu_sweep.sweeps.pruning import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def job_files(sweep_dir: Path, name: str) -> Dict[int, dict]:
    """``{trial number: contents}`` of every job's ``name`` (summary.json, trial.json)."""
    out = {}
    for path in sweep_dir.glob(f"*/{name}"):
        out[int(path.parent.name)] = json.loads(path.read_text())
    return out


# ---------------------------------------------------------------- PostgreSQL


def pg_bin(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on a loopback port; yields its SQLAlchemy URL.

    As root the server runs as the ``postgres`` user (initdb refuses root).
    """
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    assert initdb and pg_ctl
    root = Path(tempfile.mkdtemp(prefix="scu_pg_"))
    prefix: List[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    run = lambda *a: subprocess.run([*prefix, *a], check=True, capture_output=True)  # noqa: E731
    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
