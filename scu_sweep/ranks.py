"""Data-parallel runs: ``train.ranks=N`` trains one run as N processes (``mx.distributed``).

The Hydra job validates the config, writes it resolved into the run dir and starts the
ranks (ring backend on loopback, one BLAS thread each; ``mlx.launch`` across machines); every rank
then runs ``python -m scu_sweep.ranks RUN_DIR``. Rank 0 alone writes the run's files.
Across machines, pass a host file: ``hydra.job.env_set.SCU_SWEEP_HOSTFILE=hosts.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError
from .sweeps.lifeline import PARENT_ENV, die_with_env_parent
from .training.backend import preload_blas

RANK_DIR = "ranks"  # inside the run dir: resolved config and overrides for the ranks
HOSTFILE_ENV = "SCU_SWEEP_HOSTFILE"


def _free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 free on loopback (the ring backend listens on p + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, sk in enumerate(socks):
                sk.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no free block of loopback ports for the ranks")


def launch(cfg, run_dir: Path, overrides) -> int:
    """Start ``train.ranks`` processes on this run; return the first non-zero exit code (else 0)."""
    d = Path(run_dir) / RANK_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "overrides.json").write_text(json.dumps(list(overrides)))
    n = int(cfg.train.ranks)
    rank_cmd = [sys.executable, "-m", "scu_sweep.ranks", str(Path(run_dir).resolve())]
    if os.environ.get(HOSTFILE_ENV):  # other machines: mlx.launch (over ssh)
        cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()",
               "--hostfile", os.environ[HOSTFILE_ENV], "--env", "OPENBLAS_NUM_THREADS=1",
               "--env", "OMP_NUM_THREADS=1", "--cwd", os.getcwd(), "--", *rank_cmd]
        return subprocess.run(cmd).returncode
    return run_local_ranks(rank_cmd, n, d)


def run_local_ranks(rank_cmd: list, n: int, workdir: Path, env: dict | None = None) -> int:
    """Run ``rank_cmd`` as ``n`` ring-backend ranks on loopback, one BLAS thread each.

    What mlx.launch does for the ring backend (MLX_RANK + a ring host file), without its
    per-rank I/O threads, which spin on the children's stdin (~150 % CPU for 2 ranks).
    Returns the first non-zero exit code, else 0; a rank that fails stops the others.
    """
    port = _free_port_block(n)
    hosts = Path(workdir) / "ring_hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    env = dict(env or os.environ, MLX_HOSTFILE=str(hosts), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               **{PARENT_ENV: str(os.getpid())})
    procs = [subprocess.Popen(rank_cmd, env={**env, "MLX_RANK": str(r)}) for r in range(n)]
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and not code:  # a rank died: the others would wait in a collective forever
                code = failed[0]
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.2)
    finally:  # Ctrl-C or an error here: no rank outlives the job
        for p in procs:
            if p.poll() is None:
                p.kill()
    return code or next((p.returncode for p in procs if p.returncode), 0)


def main(run_dir: str) -> int:
    """One rank: join the group, run, exit 0 / 1 (run failed) / 2 (bad input)."""
    die_with_env_parent()  # a rank whose job process was SIGKILLed does not train on alone
    preload_blas()
    import mlx.core as mx  # lazy, here and below: MLX must load after preload_blas()

    from .run import RunFailed, run

    d = Path(run_dir) / RANK_DIR
    cfg = OmegaConf.load(d / "config.yaml")
    group = mx.distributed.init(strict=True)
    if group.rank() == 0:  # rank 0 speaks for the run, as the Hydra job would
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run(cfg, Path(run_dir), overrides=json.loads((d / "overrides.json").read_text()), group=group)
    except (ConfigError, RunFailed) as e:
        if group.rank() == 0:
            print(f"scu_sweep: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
