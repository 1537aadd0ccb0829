"""A job that did not return: a FAILED ``JobReturn`` filled in as Hydra's ``run_job`` fills
one, and for a worker that died mid-job, ``failure.json`` (``stop_reason: killed``) and the
``.hydra/*.yaml`` files it had no time to write."""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, List, Sequence, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from scu_sweep.records import FAILURE_FILE, SUMMARY_FILE, StopReason, atomic_write_json

log = logging.getLogger(__name__)

COMPOSE_LOCK = threading.Lock()  # Hydra's config loader and HydraConfig are not thread-safe


class WorkerDied(RuntimeError):
    """A job's worker process ended without a result (a signal, e.g. SIGKILL from the
    OOM killer or SIGSEGV from a failed allocation, or an exit mid-job)."""


class DeadWorkerReturn(JobReturn):
    """FAILED, with the :class:`WorkerDied` error in ``_return_value``; reading
    ``return_value`` gives NaN instead of raising it, like a job that failed inside
    ``main``, so Hydra's BasicSweeper (which reads every return value) goes on.
    ``failure.json`` in the job dir records the death."""

    @property
    def return_value(self) -> Any:
        return math.nan

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


def death(workers: List[Any]) -> str:
    """One line: how the worker ended, and the likely cause."""
    hint = ("out of memory? (the OOM killer sends SIGKILL; a failed allocation segfaults in "
            "MLX, exits in OpenBLAS); allowed a smaller train.batch_size or train.seq_len, or "
            "fewer hydra.launcher.n_jobs")
    codes = [(p.pid, p.exitcode) for p in workers if p.exitcode is not None]
    if not codes:
        return f"the job's worker process died (exit status unknown): {hint}"
    pid, code = codes[0]
    if code >= 0:
        return f"the job's worker process {pid} exited with code {code} mid-job: {hint}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"the job's worker process {pid} died of {name}: {hint}"


def _job_config(launcher: Any, idx: int, overrides: Sequence[str]) -> Tuple[DictConfig, DictConfig]:
    """The job's config and Hydra config as its worker had them (execute_job, then
    run_job), composed again here."""
    with COMPOSE_LOCK:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config,
                                                                      list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
        hydra_config = HydraConfig.instance()
        orig = hydra_config.cfg
        try:
            hydra_config.set_config(cfg)  # ${hydra:...} in the sweep dir resolves to this job
            out = os.path.join(str(OmegaConf.select(cfg, "hydra.sweep.dir")),
                               str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = os.path.abspath(out)
            hydra_config.set_config(cfg)
            return cfg, copy.deepcopy(hydra_config.cfg)
        finally:
            hydra_config.cfg = orig


def failed_job(launcher: Any, idx: int, overrides: Sequence[str], error: BaseException,
                cls: type = JobReturn) -> JobReturn:
    """A FAILED JobReturn filled in as run_job fills one (no dir if composing fails)."""
    ret = cls()
    ret.status = JobStatus.FAILED
    ret._return_value = error
    ret.overrides = list(overrides)
    try:
        cfg, ret.hydra_cfg = _job_config(launcher, idx, overrides)
    except Exception:  # noqa: BLE001 - the job fails all the same, without its dir
        log.exception("#%d: could not compose the job's config", idx)
        return ret
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    ret.cfg = task_cfg
    ret.overrides = OmegaConf.to_container(cfg.hydra.overrides.task)
    ret.task_name, ret.working_dir = cfg.hydra.job.name, os.getcwd()
    return ret


def dead_job(launcher: Any, idx: int, overrides: Sequence[str], error: str) -> JobReturn:
    """failure.json (stop_reason killed) in the job dir, one log line, a FAILED return."""
    ret = failed_job(launcher, idx, overrides, WorkerDied(error), cls=DeadWorkerReturn)
    if ret.hydra_cfg is None:
        log.error("#%d failed: %s", idx, error)
        return ret
    job_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
    if (job_dir / SUMMARY_FILE).exists():  # it finished, then died: the files decide
        log.error("#%d: %s, after writing %s", idx, error, SUMMARY_FILE)
        return ret
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        _save_configs(ret, job_dir)
        atomic_write_json(job_dir / FAILURE_FILE,
                          {"stop_reason": StopReason.KILLED.value, "error": error})
    except OSError as e:
        log.warning("#%d: could not write %s: %s", idx, FAILURE_FILE, e)
    log.error("#%d failed: %s (%s)", idx, error, job_dir / FAILURE_FILE)
    return ret


def _save_configs(ret: JobReturn, job_dir: Path) -> None:
    """``.hydra/*.yaml`` as run_job writes them, when the worker died before it did."""
    subdir = ret.hydra_cfg.hydra.output_subdir
    if subdir is None or (job_dir / str(subdir) / "overrides.yaml").exists():
        return
    out = job_dir / str(subdir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(ret.cfg, out / "config.yaml")
    OmegaConf.save(ret.hydra_cfg, out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(ret.overrides or [])), out / "overrides.yaml")
