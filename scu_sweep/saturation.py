"""Saturation (stop) and unreachable-target verdicts of DESIGN §2. Pure."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional


@dataclass
class SaturationConfig:
    """The stop rule's settings; also the Hydra schema of ``saturation.*``."""

    enabled: bool = True
    window: int = 10
    lambda_eps: float = 0.02
    s_tolerance: float = 0.1
    patience: int = 0
    min_steps: int = 20

    @classmethod
    def from_mapping(cls, m) -> "SaturationConfig":
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})


class SaturationDetector:
    """Fed once per control step (λ, Ŝ) and once per validation (val DataBPT).

    Saturated: over the last W control steps |λ_t − λ_{t−W}| < eps, |Ŝ − S*|/S* < tol,
    and the best validation DataBPT is at least ``patience`` evaluations old.
    Unreachable: λ sat at one bound for W steps while |Ŝ − S*|/S* > tol.
    """

    def __init__(self, cfg: SaturationConfig, target: float, lambda_min: float, lambda_max: float):
        self.cfg, self.target = cfg, target
        self.lambda_min, self.lambda_max = lambda_min, lambda_max
        self._lams: deque = deque(maxlen=cfg.window + 1)
        self._at_bound: Optional[str] = None
        self._bound_steps = 0
        self.best_val: Optional[float] = None
        self.evals_since_best = 0
        self.unreachable: Optional[str] = None  # "lambda_min" / "lambda_max" once detected

    def state_dict(self) -> dict:
        """Everything ``update``/``observe_val`` remember, as JSON (for checkpoints)."""
        return {"lams": list(self._lams), "at_bound": self._at_bound, "bound_steps": self._bound_steps,
                "best_val": self.best_val, "evals_since_best": self.evals_since_best,
                "unreachable": self.unreachable}

    def load_state(self, d: dict) -> None:
        self._lams.clear()
        self._lams.extend(d["lams"])
        self._at_bound, self._bound_steps = d["at_bound"], d["bound_steps"]
        self.best_val, self.evals_since_best = d["best_val"], d["evals_since_best"]
        self.unreachable = d["unreachable"]

    def observe_val(self, value: float) -> None:
        if self.best_val is None or value < self.best_val:
            self.best_val, self.evals_since_best = value, 0
        else:
            self.evals_since_best += 1

    def rel_error(self, s_ema: float) -> float:
        return abs(s_ema - self.target) / self.target

    def _track_bound(self, lam: float, off_target: bool) -> None:
        bound = "lambda_max" if lam >= self.lambda_max else "lambda_min" if lam <= self.lambda_min else None
        if bound is None or not off_target:
            self._at_bound, self._bound_steps = None, 0
            return
        self._bound_steps = self._bound_steps + 1 if bound == self._at_bound else 1
        self._at_bound = bound
        if self._bound_steps >= self.cfg.window:
            self.unreachable = bound

    def update(self, step: int, lam: float, s_ema: float) -> bool:
        """Record one control step; True when the run has saturated."""
        self._lams.append(lam)
        near = self.rel_error(s_ema) < self.cfg.s_tolerance
        self._track_bound(lam, off_target=self.rel_error(s_ema) > self.cfg.s_tolerance)
        if not self.cfg.enabled or step < self.cfg.min_steps or len(self._lams) <= self.cfg.window:
            return False
        stable = abs(self._lams[-1] - self._lams[0]) < self.cfg.lambda_eps
        plateau = self.cfg.patience == 0 or (
            self.best_val is not None and self.evals_since_best >= self.cfg.patience
        )
        return stable and near and plateau
