"""PI controllers on λ (DESIGN §2). Pure: floats in, frozen dataclasses out.

Two laws share one state and one config:

- ``incremental`` (the seed's, ``controller=seed``): λ ← λ·exp(Kp·e + I) every
  ``control_every`` steps, e = Ŝ − S* absolute, Ŝ an EMA of S. The update integrates
  log λ, and the weights (under Adam) integrate again: a double integrator that
  overshoots unless the loop is slow.
- ``positional`` (the default): ln λ = ln λ₀ + Kp·e + I with I ← I + Ki·e, e relative to
  the target, a continuous dead zone, and Ŝ = P/(D̄ + P) with only DataBPT smoothed, so the
  measurement carries no lag in the weights' term. A PI on an integrating plant: it settles
  and follows the weights' steady drift with zero error.

D̄ is the mean DataBPT of the last epoch's batches (``smooth=data_bpt_epoch``, the default:
every training block once, at most 1/α steps) or an EMA of DataBPT (``smooth=data_bpt``,
~1/α steps): the window has half the EMA's lag on a DataBPT that keeps falling, so the logged
S stays nearer the target once the adapter memorises, at the price of a λ that holds still less.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

LAWS = ("positional", "incremental")
ERRORS = ("relative", "absolute")
SMOOTHS = ("data_bpt", "data_bpt_epoch", "s")


@dataclass
class ControllerConfig:
    """Gains and limits; also the Hydra schema of ``controller.*`` (the one home of these defaults)."""

    law: str = "positional"  # positional | incremental (the seed's)
    error: str = "relative"  # relative: e = (Ŝ − S*)/S* | absolute: e = Ŝ − S* (the seed's)
    smooth: str = "data_bpt_epoch"  # D̄ the last epoch's mean DataBPT (Ŝ = P/(D̄+P)) | data_bpt: D̄ an EMA | s (Ŝ = EMA of S, the seed's)
    control_every: int = 1  # training steps per λ update
    kp: float = 16.0
    ki: float = 1.2
    deadband: float = 0.02
    ema_alpha: float = 0.03
    leak: float = 1.0
    e_max: float = 0.25  # positional: the integral takes e clipped to ±e_max (no wind-up in a large transient)
    i_min: float = -12.0
    i_max: float = 12.0
    lambda_init: float = 1.0
    lambda_min: float = 1e-2  # a floor where the plant still answers: no integral wound into a dead zone
    lambda_max: float = 1e4
    fixed: bool = False

    @classmethod
    def from_mapping(cls, m) -> "ControllerConfig":
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})


@dataclass(frozen=True)
class ControllerState:
    lam: float
    integral: float = 0.0
    s_ema: Optional[float] = None  # Ŝ, the S the law acts on; None until the first measurement
    d_ema: Optional[float] = None  # D̄, the smoothed DataBPT (smooth=data_bpt or data_bpt_epoch)
    steps: int = 0  # measurements taken
    window: int = 0  # smooth=data_bpt_epoch: how many recent DataBPT D̄ averages
    recent: tuple = ()  # ... and those values, oldest first

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerState":
        return cls(**{**d, "recent": tuple(d.get("recent", ()))})  # JSON brings a list back


def initial_state(cfg: ControllerConfig, steps_per_epoch: Optional[float] = None) -> ControllerState:
    """λ₀ and, for ``smooth=data_bpt_epoch``, D̄'s window: one epoch, at most 1/α steps."""
    cap = max(1, round(1 / cfg.ema_alpha))
    window = cap if steps_per_epoch is None else min(max(1, round(steps_per_epoch)), cap)
    return ControllerState(lam=cfg.lambda_init, window=window if cfg.smooth == "data_bpt_epoch" else 0)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _ema(old: Optional[float], new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


def smoothed(state: ControllerState, data_bits: float, param_bits: float, cfg: ControllerConfig) -> ControllerState:
    """The state with this step's measurement folded into Ŝ (and D̄)."""
    if cfg.smooth == "s":
        return replace(state, s_ema=_ema(state.s_ema, param_bits / (data_bits + param_bits), cfg.ema_alpha),
                       steps=state.steps + 1)
    recent = (state.recent + (data_bits,))[-state.window:] if state.window else ()
    d_bar = sum(recent) / len(recent) if recent else _ema(state.d_ema, data_bits, cfg.ema_alpha)
    return replace(state, s_ema=param_bits / (d_bar + param_bits), d_ema=d_bar, recent=recent,
                   steps=state.steps + 1)


def error(s_hat: float, target: float, cfg: ControllerConfig) -> float:
    """Ŝ − S*, divided by S* when ``error=relative``."""
    return (s_hat - target) / target if cfg.error == "relative" else s_hat - target


def step(state: ControllerState, data_bits: float, param_bits: float, target: float,
         cfg: ControllerConfig) -> ControllerState:
    """One training step's measurement; λ moves every ``control_every`` steps.

    S above target gives e > 0 and raises λ (a stronger prior shrinks ParamBPT).
    """
    state = smoothed(state, data_bits, param_bits, cfg)
    if cfg.fixed or state.steps % cfg.control_every:
        return state
    e = error(state.s_ema, target, cfg)
    if cfg.law == "incremental":
        return _incremental(state, e, cfg)
    return _positional(state, e, cfg)


def _pushing_out(state: ControllerState, e: float, cfg: ControllerConfig) -> bool:
    """λ sits at a bound and e pushes it further out (anti-windup: do not integrate)."""
    return (state.lam >= cfg.lambda_max and e > 0) or (state.lam <= cfg.lambda_min and e < 0)


def _integrate(state: ControllerState, e: float, cfg: ControllerConfig) -> float:
    """I·leak + Ki·e, clamped to [i_min, i_max]; only leaked while λ sits at a bound pushed out."""
    leaked = state.integral * cfg.leak
    return leaked if _pushing_out(state, e, cfg) else _clamp(leaked + cfg.ki * e, cfg.i_min, cfg.i_max)


def _incremental(state: ControllerState, e: float, cfg: ControllerConfig) -> ControllerState:
    """DESIGN §2's seed law: inside the deadband λ holds and I only leaks."""
    if abs(e) <= cfg.deadband:
        return replace(state, integral=state.integral * cfg.leak)
    integral = _integrate(state, e, cfg)
    # the exponent is clamped first: exp() of a huge gain times e would overflow
    step_log = _clamp(cfg.kp * e + integral, math.log(cfg.lambda_min / state.lam) - 1,
                      math.log(cfg.lambda_max / state.lam) + 1)
    lam = _clamp(state.lam * math.exp(step_log), cfg.lambda_min, cfg.lambda_max)
    return replace(state, lam=lam, integral=integral)


def _positional(state: ControllerState, e: float, cfg: ControllerConfig) -> ControllerState:
    """ln λ = ln λ₀ + Kp·e + I on the error past a continuous dead zone (no jump at its edge)."""
    e = math.copysign(max(abs(e) - cfg.deadband, 0.0), e)
    integral = _integrate(state, _clamp(e, -cfg.e_max, cfg.e_max), cfg)
    log_lam = math.log(cfg.lambda_init) + cfg.kp * e + integral
    # a bound comes back exactly (not exp(log(bound))): the anti-windup test compares with it
    if log_lam <= math.log(cfg.lambda_min):
        lam = cfg.lambda_min
    elif log_lam >= math.log(cfg.lambda_max):
        lam = cfg.lambda_max
    else:
        lam = math.exp(log_lam)
    return replace(state, lam=lam, integral=integral)
