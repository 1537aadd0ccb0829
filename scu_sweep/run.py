"""``run(cfg, run_dir)``: validate, build, train, keep the adapter, write the summary."""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from pathlib import Path

import mlx.core as mx

from .config import ConfigError
from .models import load as models
from .models.lora import apply_lora, count_trainable, save_adapter
from .records import ADAPTER_DIR, FAILURE_FILE, SUMMARY_FILE, StopReason, atomic_write_json
from .redact import redact_text
from .sweeps import resume
from .sweeps.pruning import make_reporter
from .tracking.sinks import make_sinks
from .training import checkpoint
from .training.data import load_corpus
from .training.loop import Diverged, RunResult, rank_size, train
from .validation import validate

log = logging.getLogger(__name__)

_FINAL_KEYS = ("loss", "data_bpt", "param_bpt", "s_ratio", "s_ema", "lambda", "integral", "val_loss", "val_data_bpt",
               "val_s_ratio")


class RunFailed(RuntimeError):
    """Training started but could not finish (e.g. a non-finite loss); one-line message."""


class DiskError(ConfigError):
    """The run dir cannot be written (read-only, no permission): bad input, exit 2."""


_OOM_TEXT = ("out of memory", "bad_alloc", "malloc]", "failed to allocate", "attempting to allocate")  # GPU allocators; CPU dies


def write_failure(run_dir: Path, stop_reason: StopReason, error: str) -> None:
    """failure.json, if the disk lets us (a full or read-only disk may not)."""
    try:
        atomic_write_json(Path(run_dir) / FAILURE_FILE, {"stop_reason": stop_reason.value,
                                                         "error": redact_text(error)})
    except OSError as e:
        log.warning("could not write %s: %s", FAILURE_FILE, e)


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def fault(e: BaseException, cfg, run_dir: Path) -> tuple | None:
    """(one-line error, stop reason) for an out-of-memory or disk fault, else None."""
    tc = cfg.train
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT)):
        return RunFailed(f"train.batch_size={tc.batch_size}: out of memory ({type(e).__name__}: {e}); "
                         "allowed a smaller train.batch_size or train.seq_len"), StopReason.OUT_OF_MEMORY
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or (isinstance(e, RuntimeError) and "unable to write" in str(e).lower()):  # MLX's own writer
        what = f"{e.strerror}: {e.filename}" if full else str(e)
        return RunFailed(f"hydra.run.dir={run_dir}: disk full ({what}; {_free(run_dir)} bytes free); allowed a "
                         "directory with free space"), StopReason.DISK_FULL
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(f"hydra.run.dir={run_dir}: not writable ({e.strerror}: {e.filename}); allowed a "
                         "writable directory"), StopReason.UNWRITABLE
    return None


def _summary(cfg, result: RunResult, corpus, n_params: int, adapter_dir: Path, base: str, overrides) -> dict:
    final = {k: result.adapter_row.get(k) for k in _FINAL_KEYS}
    return {
        "target_s": float(cfg.target_s),
        "kp": float(cfg.controller.kp),
        "ki": float(cfg.controller.ki),
        "prior_sigma": float(cfg.prior.sigma),
        "final": final,
        "best": result.best,
        "stop_reason": result.stop_reason.value,
        "prune_reason": result.prune_reason,
        "saturation_step": result.saturation_step,
        "adapter_step": result.adapter_row["step"],
        "adapter_kept": result.kept,
        "steps_run": result.steps_run,
        "tokens_seen": result.tokens_seen,
        "train_tokens": corpus.train_tokens,
        "val_tokens": corpus.val_tokens,
        "trainable_params": n_params,
        "started_at": result.started_at,
        "wall_s": result.wall_s,
        "pid": os.getpid(),
        "tokens_per_s": result.tokens_seen / result.wall_s if result.wall_s > 0 else 0.0,
        "adapter_path": str(adapter_dir),
        "model": base,
        "data": cfg.data.name,
        "unreachable": result.unreachable,
        "controller_state": result.controller.to_dict() if result.controller else None,
        "overrides": [redact_text(str(o)) for o in overrides],
    }


def _check_context(model, cfg) -> None:
    ctx = models.context_length(model, cfg.model)
    if ctx is not None and cfg.train.seq_len > ctx:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len}: allowed an int <= the model's context {ctx}")


def _train(model, corpus, cfg, run_dir: Path, log_row, reporter, group, lead: bool, ckpt, fingerprint: str):
    """train(); a non-finite loss becomes RunFailed (and failure.json, written by the lead)."""
    try:
        return train(model, corpus, cfg, log_row, reporter, group, run_dir=run_dir, resume_from=ckpt,
                     config_hash=fingerprint)
    except Diverged as e:
        if lead:
            write_failure(run_dir, StopReason.DIVERGED, str(e))
        raise RunFailed(f"train.lr={cfg.train.lr}: {e}; allowed a smaller train.lr or controller.lambda_max, "
                        f"or a larger prior.sigma={cfg.prior.sigma} (the penalty's pull grows as 1/σ²)") from e


def run(cfg, run_dir: Path, overrides=(), group=None) -> float:
    """One SCU training run; returns the objective (validation DataBPT of the kept adapter).

    With an ``mx.distributed`` group (``train.ranks`` > 1) every rank trains its shard;
    rank 0 alone writes files, logs and talks to Optuna.
    """
    validate(cfg)
    run_dir = Path(run_dir)
    fingerprint = resume.fingerprint(cfg)
    lead = rank_size(group)[0] == 0
    lock = None
    try:
        lock = _lock(run_dir) if lead else None
        return _run(cfg, run_dir, overrides, group, fingerprint)
    except (MemoryError, OSError, RuntimeError) as e:
        found = fault(e, cfg, run_dir)
        if found is None:
            raise
        err, reason = found
        if lead:
            write_failure(run_dir, reason, str(err))
        raise err from e
    finally:
        if lock is not None:
            lock.release()


def _lock(run_dir: Path):
    """Hold the run dir for this process: a second live run there is bad input, not a race."""
    try:
        return resume.DirLock(run_dir)
    except BlockingIOError as e:
        raise ConfigError(f"hydra.run.dir={run_dir}: another live run is using it; allowed a directory "
                          "no running scu_sweep holds") from e


def _run(cfg, run_dir: Path, overrides, group, fingerprint: str) -> float:
    rank, n_ranks = rank_size(group)
    lead = rank == 0
    done = resume.finished_summary(cfg, run_dir, fingerprint)
    if done is not None:  # a restarted sweep: this job finished before the interruption
        log.info("%s: already finished (%s); not run again", run_dir, done["stop_reason"])
        return objective(done)
    model, tokenizer, base = models.load(cfg.model)
    _check_context(model, cfg)
    corpus = load_corpus(cfg.data, tokenizer, cfg.train.seq_len)
    mx.random.seed(cfg.train.seed)  # here, so LoRA init and dropout never depend on how the base was built
    adapter_config = apply_lora(model, cfg.lora)
    n_params = count_trainable(model)
    ckpt = resume.checkpoint_to_resume(cfg, run_dir, fingerprint)
    if not lead:
        _train(model, corpus, cfg, run_dir, lambda row: None, None, group, lead, ckpt, fingerprint)
        return math.nan
    resume.prepare_run_dir(run_dir, ckpt)
    log.info("N=%d train tokens, %d val tokens, %d trainable params", corpus.train_tokens, corpus.val_tokens, n_params)

    reporter = None
    if cfg.pruning.storage:
        reporter = make_reporter(cfg.pruning)
    sinks = make_sinks(cfg, run_dir, resumed=ckpt is not None)
    try:
        result = _train(model, corpus, cfg, run_dir, sinks.log, reporter, group, lead, ckpt, fingerprint)
        adapter_dir = save_adapter(model, run_dir / ADAPTER_DIR, adapter_config, base)
        summary = _summary(cfg, result, corpus, n_params, adapter_dir, base, overrides)
        summary.update(ranks=n_ranks, config_hash=fingerprint, resumed_from_step=ckpt.step if ckpt else None)
        sinks.summary(summary, adapter_dir)
        atomic_write_json(run_dir / SUMMARY_FILE, summary)  # last: its presence means success
    finally:
        sinks.close()
    checkpoint.remove(run_dir)  # only for resuming; the kept adapter is in adapters/
    return objective(summary)


def objective(summary: dict) -> float:
    """The value a sweep optimises: validation DataBPT of the kept adapter (NaN if absent)."""
    value = summary["final"]["val_data_bpt"]
    return float(value) if value is not None else math.nan
