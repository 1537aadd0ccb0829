"""PI controller on λ (DESIGN §2). Pure: floats in, frozen dataclasses out."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass
class ControllerConfig:
    """Gains and limits; also the Hydra schema of ``controller.*`` (the one home of these defaults)."""

    kp: float = 0.8
    ki: float = 0.15
    deadband: float = 0.002
    ema_alpha: float = 0.1
    leak: float = 0.995
    i_min: float = -0.2
    i_max: float = 0.2
    lambda_init: float = 1.0
    lambda_min: float = 1e-4
    lambda_max: float = 10.0
    fixed: bool = False

    @classmethod
    def from_mapping(cls, m) -> "ControllerConfig":
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})


@dataclass(frozen=True)
class ControllerState:
    lam: float
    integral: float = 0.0
    s_ema: Optional[float] = None  # None until the first measurement

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerState":
        return cls(**d)


def initial_state(cfg: ControllerConfig) -> ControllerState:
    return ControllerState(lam=cfg.lambda_init)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def step(state: ControllerState, s: float, target: float, cfg: ControllerConfig) -> ControllerState:
    """One control step: EMA of S, then the PI update of λ with e = Ŝ − S*.

    S above target gives e > 0 and raises λ (a stronger prior shrinks ParamBPT).
    """
    s_ema = s if state.s_ema is None else (1 - cfg.ema_alpha) * state.s_ema + cfg.ema_alpha * s
    if cfg.fixed:
        return replace(state, s_ema=s_ema)
    e = s_ema - target
    leaked = state.integral * cfg.leak
    if abs(e) <= cfg.deadband:
        return ControllerState(lam=state.lam, integral=leaked, s_ema=s_ema)
    # Anti-windup: no integration while λ sits at a bound and e pushes further out.
    pushing_out = (state.lam >= cfg.lambda_max and e > 0) or (state.lam <= cfg.lambda_min and e < 0)
    integral = leaked if pushing_out else _clamp(leaked + cfg.ki * e, cfg.i_min, cfg.i_max)
    # the exponent is clamped first: exp() of a huge gain times e would overflow
    step_log = _clamp(cfg.kp * e + integral, math.log(cfg.lambda_min / state.lam) - 1, math.log(cfg.lambda_max / state.lam) + 1)
    lam = _clamp(state.lam * math.exp(step_log), cfg.lambda_min, cfg.lambda_max)
    return ControllerState(lam=lam, integral=integral, s_ema=s_ema)
