"""``run(cfg, run_dir)``: validate, build, train, keep the adapter, write the summary."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import mlx.core as mx

from . import checkpoint, models, resume
from .config import ConfigError, validate
from .data import load_corpus
from .lora import apply_lora, count_trainable, save_adapter
from .records import ADAPTER_DIR, FAILURE_FILE, SUMMARY_FILE, StopReason, atomic_write_json
from .train import Diverged, RunResult, rank_size, train

log = logging.getLogger(__name__)

_FINAL_KEYS = ("loss", "data_bpt", "param_bpt", "s_ratio", "s_ema", "lambda", "integral", "val_loss", "val_data_bpt")


class RunFailed(RuntimeError):
    """Training started but could not finish (e.g. a non-finite loss); one-line message."""


def _summary(cfg, result: RunResult, corpus, n_params: int, adapter_dir: Path, base: str, overrides) -> dict:
    final = {k: result.last_row.get(k) for k in _FINAL_KEYS}
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
        "adapter_step": result.steps_run,
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
        "overrides": list(overrides),
    }


def _check_context(model, cfg) -> None:
    ctx = models.context_length(model, cfg.model)
    if ctx is not None and cfg.train.seq_len > ctx:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len}: allowed an int <= the model's context {ctx}")


def _train(model, corpus, cfg, run_dir: Path, log_row, reporter, group, lead: bool, ckpt=None):
    """train(); a non-finite loss becomes RunFailed (and failure.json, written by the lead)."""
    try:
        return train(model, corpus, cfg, log_row, reporter, group, run_dir=run_dir, resume_from=ckpt)
    except Diverged as e:
        if lead:
            atomic_write_json(run_dir / FAILURE_FILE, {"stop_reason": StopReason.DIVERGED.value, "error": str(e)})
        raise RunFailed(f"train.lr={cfg.train.lr}: {e}; allowed a smaller train.lr or controller.lambda_max") from e


def run(cfg, run_dir: Path, overrides=(), group=None) -> float:
    """One SCU training run; returns the objective (validation DataBPT of the kept adapter).

    With an ``mx.distributed`` group (``train.ranks`` > 1) every rank trains its shard;
    rank 0 alone writes files, logs and talks to Optuna.
    """
    validate(cfg)
    run_dir = Path(run_dir)
    fingerprint = resume.fingerprint(cfg)
    lock = _lock(run_dir) if rank_size(group)[0] == 0 else None
    try:
        return _run(cfg, run_dir, overrides, group, fingerprint)
    finally:
        if lock is not None:
            lock.release()


def _lock(run_dir: Path):
    """Hold the run dir for this process: a second live run there is bad input, not a race."""
    try:
        return resume.DirLock(run_dir)
    except OSError as e:
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
        _train(model, corpus, cfg, run_dir, lambda row: None, None, group, lead, ckpt)
        return math.nan
    resume.prepare_run_dir(run_dir, ckpt)
    log.info("N=%d train tokens, %d val tokens, %d trainable params", corpus.train_tokens, corpus.val_tokens, n_params)

    from .sinks import make_sinks

    reporter = None
    if cfg.pruning.storage:
        from .pruning import make_reporter

        reporter = make_reporter(cfg.pruning)
    sinks = make_sinks(cfg, run_dir)
    try:
        result = _train(model, corpus, cfg, run_dir, sinks.log, reporter, group, lead, ckpt)
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
