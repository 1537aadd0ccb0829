"""Run N sweep workers as Ray tasks, all sharing one Optuna study.

Each task runs one independent sweep process (``python -m scu_sweep -m
hydra/sweeper=optuna ...``, basic launcher) on the shared storage, so Ray only places
processes; Optuna's storage coordinates the trials. On a cluster, start Ray
(``ray start --head`` / ``ray start --address=...``), use a storage every node reaches
(PostgreSQL, or a journal file on a shared filesystem) and a shared sweep dir::

    python launchers/ray_workers.py --workers 8 --address auto \\
        --storage postgresql://user:pw@db-host/optuna --study kp_ki \\
        --sweep-dir /shared/sweeps/kp_ki -- experiment=optuna_kp_ki_target hydra.sweeper.n_trials=5

Without ``--address`` a local Ray instance is started (the test uses that).
Ray starts its workers as fresh processes, never as forks of this one (MLX needs that).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def worker_command(app: str, sweep_dir: str, storage: str, study: str, extra: list, index: int = 0) -> list:
    """Worker ``index``'s sweep process (``hydra.sweeper.worker``: a restart counts only its own trials)."""
    return [*shlex.split(app), "-m", "hydra/sweeper=optuna", "hydra/launcher=basic",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.sweeper.storage='{storage}'", f"hydra.sweeper.study_name={study}",
            "hydra.sweeper.load_if_exists=true", "hydra.sweeper.n_jobs=1", f"hydra.sweeper.worker={index}", *extra]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, required=True, help="sweep processes (Ray tasks)")
    ap.add_argument("--storage", required=True, help="Optuna storage URL or journal:<file>")
    ap.add_argument("--study", required=True, help="study name shared by the workers")
    ap.add_argument("--sweep-dir", required=True, help="sweep dir shared by the workers")
    ap.add_argument("--address", default=None, help="Ray cluster address (e.g. auto)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--app", default=f"{sys.executable} -m scu_sweep", help="command to run")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = ap.parse_args()

    import ray

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             **({} if args.address else {"num_cpus": max(args.workers, 1)}))
    env = dict(os.environ, OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    cwd = os.getcwd()

    @ray.remote(num_cpus=args.cpus_per_worker)
    def sweep_worker(index: int) -> tuple:
        cmd = worker_command(args.app, args.sweep_dir, args.storage, args.study, args.overrides, index)
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        return index, proc.returncode, proc.stderr[-2000:]

    os.makedirs(args.sweep_dir, exist_ok=True)
    results = ray.get([sweep_worker.remote(i) for i in range(args.workers)])
    ray.shutdown()
    failed = [(i, err) for i, rc, err in results if rc != 0]
    for i, err in failed:
        print(f"worker {i} failed:\n{err}", file=sys.stderr)
    print(f"{args.workers - len(failed)} of {args.workers} workers finished; "
          f"results: {args.sweep_dir}/optimization_results.yaml")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
