"""The SCU training loop: compiled LoRA step with λ as an input, PI control, stop rules."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..models.lora import sum_sq
from ..records import StopReason
from ..scu import mdl
from ..scu.controller import ControllerConfig, ControllerState, initial_state
from ..scu.controller import step as control_step
from ..scu.saturation import SaturationConfig, SaturationDetector, keeps
from . import checkpoint, core_share, kernel_cache
from .data import Corpus, batch_indices, val_batches
from .losses import causal_lm_loss

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The training loss became non-finite, or exploded past ``train.diverge_factor`` × its start."""


def ce_loss(model, x, y):
    """Mean next-token cross-entropy in nats (fp32 logits); on CPU the output head and the
    loss are fused, with the same value and gradient (losses.causal_lm_loss)."""
    return causal_lm_loss(model, x, y)


def make_train_step(model, optimizer, coef: float, group=None):
    """Compiled step(x, y, lam) -> (ce, Σw² after the update); the loss is CE + lam·coef·Σw².

    ``lam`` is an mx.array argument, so a new λ reaches the gradient without a
    retrace; model, optimizer and RNG state are declared compile inputs/outputs.
    With a distributed ``group`` each rank holds an equal shard of the batch:
    gradients and CE are averaged across ranks, so every rank sees the global values.
    """

    def loss_fn(model, x, y, lam):
        ce = ce_loss(model, x, y)
        ssq = sum_sq(model.trainable_parameters())
        return ce + lam * coef * ssq, ce, ssq

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, lam):
        (_, ce, ssq), grads = loss_and_grad(model, x, y, lam)
        if group is not None:
            grads = nn.average_gradients(grads, group=group)
            ce = mx.distributed.all_sum(ce, group=group) / group.size()
        optimizer.update(model, grads)
        return ce, sum_sq(model.trainable_parameters())  # the weights this step leaves (and a save keeps)

    return step


def make_optimizer(train_cfg) -> optim.Optimizer:
    """AdamW without weight decay: the SCU prior is the only regulariser."""
    lr = train_cfg.lr
    if train_cfg.warmup_steps > 0:
        lr = optim.join_schedules(
            [optim.linear_schedule(0.0, train_cfg.lr, train_cfg.warmup_steps), lambda _: train_cfg.lr],
            [train_cfg.warmup_steps],
        )
    return optim.AdamW(learning_rate=lr, weight_decay=0.0)


def rank_size(group) -> tuple:
    """(this process's rank, number of ranks); (0, 1) without a distributed group."""
    return (group.rank(), group.size()) if group is not None else (0, 1)


def evaluate(model, eval_ce, corpus: Corpus, batch_size: int, n_batches: int, group=None) -> float:
    """Token-weighted mean validation CE (nats) over a fixed subset of val blocks.

    With a ``group`` each rank takes its own rows of every batch and the sums are reduced.
    """
    rank, size = rank_size(group)
    model.eval()
    total, count = 0.0, 0
    for block in val_batches(corpus.val, batch_size, n_batches):
        block = block[rank::size]
        if len(block):
            b = mx.array(block)
            n = block.shape[0] * (block.shape[1] - 1)
            total += eval_ce(b[:, :-1], b[:, 1:]).item() * n
            count += n
    model.train()
    if group is not None:
        total, count = mx.distributed.all_sum(mx.array([total, float(count)]), group=group).tolist()
    return total / count


@dataclass
class RunResult:
    stop_reason: StopReason
    steps_run: int
    adapter_row: dict  # the metrics row (with validation) of the weights the model now holds
    kept: str = "last"  # which rule chose them: best_in_band, or last (no evaluation was in band)
    prune_reason: Optional[str] = None
    saturation_step: Optional[int] = None
    unreachable: Optional[dict] = None
    best: dict = field(default_factory=dict)
    wall_s: float = 0.0
    started_at: float = 0.0  # unix time of the first step
    tokens_seen: int = 0
    controller: Optional[ControllerState] = None


def _check_growth(step: int, ce: float, ssq: float, bits: float, bits_start: float, factor: float) -> None:
    """Raise Diverged on a non-finite loss, or when DataBPT + ParamBPT (the code length per
    token) exceeds ``factor`` × its start: a blow-up even where it stays finite."""
    if not (math.isfinite(ce) and math.isfinite(ssq)):
        raise Diverged(f"non-finite loss at step {step} (CE={ce}, Σw²={ssq})")
    if bits > factor * bits_start:
        raise Diverged(f"loss exploded at step {step}: DataBPT + ParamBPT = {bits:.4g} bits > "
                       f"train.diverge_factor={factor:g} × the start's {bits_start:.4g}")


def _row(step, ce, ssq, st: ControllerState, s, coef, lr, tokens, wall) -> dict:
    dbits, pbits = mdl.data_bpt(ce), ssq * coef / mdl.LN2
    return {
        "step": step, "loss": ce, "data_bpt": dbits, "param_bpt": pbits, "s_ratio": s,
        "s_ema": st.s_ema, "lambda": st.lam, "integral": st.integral, "lr": lr,
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
    }


def _evaluate_into(row: dict, best: dict, model, eval_ce, corpus: Corpus, tc, group=None) -> dict:
    """Add val_loss / val_data_bpt to ``row``; return the updated best-validation record."""
    val_ce = evaluate(model, eval_ce, corpus, tc.batch_size, tc.val_batches, group)
    row.update(val_loss=val_ce, val_data_bpt=mdl.data_bpt(val_ce))
    row.update(val_s_ratio=mdl.s_ratio(row["val_data_bpt"], row["param_bpt"]))
    if not best or row["val_data_bpt"] < best["val_data_bpt"]:
        return {"val_data_bpt": row["val_data_bpt"], "val_loss": val_ce, "val_step": row["step"]}
    return best


def _keep(kept: Optional[tuple], row: dict, model, target: float, scfg: SaturationConfig) -> Optional[tuple]:
    """(row, adapter arrays) of the adapter to keep after evaluating ``row`` (keep=best_in_band).

    MLX arrays are immutable and every step makes new ones, so holding references is a snapshot."""
    if scfg.keep == "best_in_band" and keeps(row["val_data_bpt"], row["param_bpt"], kept and kept[0]["val_data_bpt"],
                                             target, scfg.s_tolerance):
        return dict(row), dict(tree_flatten(model.trainable_parameters()))
    return kept


def _first_runs(model, cfg, coef: float, group) -> Callable[[str], contextlib.AbstractContextManager]:
    """``once(name)``: kernel_cache.built_once around this process's first run of the graph
    ``name`` (its key: architecture, LoRA, shapes, the penalty constant); later runs, and ranks
    (whose collectives must not wait on a lock), get no lock."""
    graph = "|".join(map(str, (getattr(model, "args", None), repr(model), cfg.train.batch_size,
                               cfg.train.seq_len, coef)))
    seen: set = set()

    def once(name: str) -> contextlib.AbstractContextManager:
        if group is not None or name in seen:
            return contextlib.nullcontext()
        seen.add(name)
        return kernel_cache.built_once(f"{graph}|{name}")

    return once


def _any_rank(flag: bool, group) -> bool:
    """True on every rank when ``flag`` is true on any (rank 0 alone talks to Optuna)."""
    if group is None:
        return flag
    return mx.distributed.all_sum(mx.array(float(flag)), group=group).item() > 0


def _restore(ckpt, model, optimizer, detector) -> tuple:
    """Put a checkpoint's weights, optimizer and detector back; return its loop state and kept adapter."""
    checkpoint.restore(ckpt, model, optimizer)
    detector.load_state(ckpt.state["detector"])
    log.info("resuming from the checkpoint of step %d", ckpt.step)
    kept_row = ckpt.state.get("kept_row")
    return ckpt.state, (kept_row, checkpoint.arrays_under(ckpt, "kept")) if kept_row else None


def train(model, corpus: Corpus, cfg, log_row: Callable[[dict], None], reporter=None, group=None,
          run_dir=None, resume_from=None, config_hash: str | None = None) -> RunResult:
    """Train until saturation, pruning, divergence or ``train.steps``.

    ``group``: an ``mx.distributed`` group; each rank trains on its rows of every batch.
    ``run_dir``: where rank 0 writes a checkpoint every ``train.checkpoint_every`` steps;
    ``resume_from``: a checkpoint (scu_sweep.training.checkpoint) to continue from; ``config_hash``
    (resume.fingerprint of ``cfg``) goes into each checkpoint, so only this config resumes it.
    """
    tc = cfg.train
    target = float(cfg.target_s)
    ccfg = ControllerConfig.from_mapping(cfg.controller)
    scfg = SaturationConfig.from_mapping(cfg.saturation)
    steps_per_epoch = len(corpus.train) / tc.batch_size
    detector = SaturationDetector(scfg, target, ccfg.lambda_min, ccfg.lambda_max, steps_per_epoch=steps_per_epoch)
    coef = mdl.penalty_coef(cfg.prior.sigma, corpus.train_tokens)
    optimizer = make_optimizer(tc)
    rank, size = rank_size(group)
    resumed, kept = _restore(resume_from, model, optimizer, detector) if resume_from is not None else ({}, None)
    step_fn = make_train_step(model, optimizer, coef, group)
    in_study = bool(cfg.pruning.storage)
    eval_ce = mx.compile(partial(ce_loss, model), inputs=model.state)
    once = _first_runs(model, cfg, coef, group)

    def evaluate_row(row: dict, best: dict) -> dict:
        with once("eval"):
            return _evaluate_into(row, best, model, eval_ce, corpus, tc, group)

    state = ControllerState.from_dict(resumed["controller"]) if resumed else initial_state(ccfg, steps_per_epoch)
    tokens_per_step = tc.batch_size * tc.seq_len
    best: dict = resumed.get("best", {})
    unreachable = resumed.get("unreachable")
    stop, prune_reason, sat_step = StopReason.MAX_STEPS, None, None
    wall0 = resumed.get("wall_s", 0.0)  # training time before the restart
    t0, started_at = time.perf_counter(), resumed.get("started_at", time.time())
    row: dict = resumed.get("row", {})
    bits_start = resumed.get("bits_start")  # DataBPT of step 1 + ParamBPT of the initial adapter
    p_init = sum_sq(model.trainable_parameters()).item() * coef / mdl.LN2 if bits_start is None else None
    first = resumed.get("step", 0) + 1
    for step in range(first, tc.steps + 1):
        if group is None:  # ranks keep one thread each
            core_share.follow()
        rows = batch_indices(step - 1, len(corpus.train), tc.batch_size, tc.seed)
        b = mx.array(corpus.train[rows[rank::size]])
        mx.random.seed(tc.seed * 1_000_003 + step)  # dropout masks depend on (seed, step) alone: resumable
        with once("step"):
            ce_a, ssq_a = step_fn(b[:, :-1], b[:, 1:], mx.array(state.lam, dtype=mx.float32))
            mx.eval(ce_a, ssq_a)
        ce, ssq = ce_a.item(), ssq_a.item()
        dbits, pbits = mdl.data_bpt(ce), ssq * coef / mdl.LN2
        bits_start = bits_start if bits_start is not None else dbits + p_init
        _check_growth(step, ce, ssq, dbits + pbits, bits_start, tc.diverge_factor)
        state = control_step(state, dbits, pbits, target, ccfg)
        s = mdl.s_ratio(dbits, pbits)
        wall = wall0 + time.perf_counter() - t0
        row = _row(step, ce, ssq, state, s, coef, float(optimizer.learning_rate), step * tokens_per_step, wall)
        evaluate_now = step % tc.eval_every == 0 or step == tc.steps
        if evaluate_now:
            best = evaluate_row(row, best)
            detector.observe_val(step, row["val_data_bpt"])
            kept = _keep(kept, row, model, target, scfg)
        done = state.steps % ccfg.control_every == 0 and detector.update(step, state.lam, state.s_ema)
        if done and not evaluate_now:  # the stop's weights get their own validation
            best = evaluate_row(row, best)
            kept = _keep(kept, row, model, target, scfg)
            evaluate_now = True
        if evaluate_now or step % tc.log_every == 0:
            log_row(row)
        if detector.unreachable and unreachable is None:
            unreachable = {"bound": detector.unreachable, "step": step}
            bound_val = getattr(ccfg, detector.unreachable)
            log.warning(
                "target_s=%g looks unreachable: λ has sat at controller.%s=%g for %d steps with Ŝ=%.4g",
                target, detector.unreachable, bound_val, cfg.saturation.window, state.s_ema,
            )
            if in_study:
                stop, prune_reason = StopReason.PRUNED, "unreachable"
                break
        if evaluate_now and _any_rank(reporter is not None and reporter.report(step, row["val_data_bpt"]), group):
            stop, prune_reason = StopReason.PRUNED, "pruner"
            break
        if done:
            stop, sat_step = StopReason.SATURATED, step
            break
        if run_dir is not None and rank == 0 and tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            checkpoint.save(run_dir, step, model, optimizer, {
                "config_hash": config_hash, "controller": state.to_dict(), "detector": detector.state_dict(), "best": best,
                "unreachable": unreachable, "row": row, "wall_s": wall, "started_at": started_at,
                "bits_start": bits_start, "kept_row": kept and kept[0]}, kept=kept and kept[1])
    if "val_data_bpt" not in row:  # pruned between evaluations
        best = evaluate_row(row, best)
        kept = _keep(kept, row, model, target, scfg)
    adapter_row = row
    if kept is not None:
        adapter_row = kept[0]
        if adapter_row["step"] != row["step"]:
            model.load_weights(list(kept[1].items()), strict=False)
            mx.eval(model.parameters())
            log.info("keeping the adapter of step %d (S from validation %.4g, validation DataBPT %.4f)",
                     adapter_row["step"], adapter_row["val_s_ratio"], adapter_row["val_data_bpt"])
    return RunResult(
        stop_reason=stop, steps_run=row["step"], adapter_row=adapter_row,
        kept="best_in_band" if kept is not None else "last", prune_reason=prune_reason,
        saturation_step=sat_step, unreachable=unreachable, best=best,
        wall_s=wall0 + time.perf_counter() - t0, started_at=started_at, tokens_seen=row["tokens"], controller=state,
    )
