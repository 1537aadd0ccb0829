"""Saturation (stop) and unreachable-target verdicts of DESIGN §2. Pure."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from .mdl import s_ratio


@dataclass
class SaturationConfig:
    """The stop rule's settings; also the Hydra schema of ``saturation.*``."""

    enabled: bool = True
    window: int = 20
    lambda_eps: float = 0.25
    lambda_change: str = "relative"  # relative: |λ_t − λ_{t−W}| / λ_{t−W} | absolute: |λ_t − λ_{t−W}| (DESIGN §2)
    s_tolerance: float = 0.1
    patience: int = 2
    patience_epochs: float = 1.0  # once training data repeats, the best validation is also this many epochs old
    min_delta: float = 0.0
    min_steps: int = 20
    keep: str = "best_in_band"  # the adapter a run keeps: best_in_band | last (see keeps())

    @classmethod
    def from_mapping(cls, m) -> "SaturationConfig":
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})


KEEP_RULES = ("best_in_band", "last")


def keeps(val_data_bpt: float, param_bpt: float, kept_val: Optional[float], target: float, tol: float) -> bool:
    """Whether an evaluated adapter replaces the kept one under ``keep=best_in_band``: S from
    its ParamBPT and its validation DataBPT is within ``tol`` of the target (relative), and
    its validation DataBPT is lower than the kept adapter's (Keras' restore_best_weights,
    restricted to adapters that hold the target)."""
    in_band = abs(s_ratio(val_data_bpt, param_bpt) - target) <= tol * target
    return in_band and (kept_val is None or val_data_bpt < kept_val)


class SaturationDetector:
    """Fed once per control step (λ, Ŝ) and once per validation (val DataBPT).

    Saturated: over the last W control steps λ moved less than eps (relative to λ_{t−W}, or
    absolute), every Ŝ of the window was within tol of S* (relative), and the best validation
    DataBPT (an improvement counts only when larger than ``min_delta`` bits) is at least
    ``patience`` evaluations old and, once the run is past its first epoch (``steps_per_epoch``
    steps, one pass over the training blocks), at least ``patience_epochs`` epochs old.

    Why epochs: when training blocks come round again their DataBPT drops at once, the
    controller answers with a λ transient, and validation worsens for a while, then improves
    again within that epoch (measured on SmolLM2/python_docs; README, "The stop"). A few
    evaluations without a new best is then a dip, not a plateau; a whole epoch without one is.
    Unreachable: λ sat at one bound for W steps while |Ŝ − S*|/S* > tol and got no smaller.
    """

    def __init__(self, cfg: SaturationConfig, target: float, lambda_min: float, lambda_max: float,
                 steps_per_epoch: Optional[float] = None):
        self.cfg, self.target = cfg, target
        self.lambda_min, self.lambda_max = lambda_min, lambda_max
        self.steps_per_epoch = steps_per_epoch  # None: epochs unknown, ``patience`` alone decides
        self._lams: deque = deque(maxlen=cfg.window + 1)
        self._in_band = 0  # consecutive control steps with Ŝ within tolerance
        self._at_bound: Optional[str] = None
        self._bound_errs: list = []  # relative errors since λ reached that bound (the last W)
        self.best_val: Optional[float] = None
        self.best_step: Optional[int] = None
        self.evals_since_best = 0
        self.unreachable: Optional[str] = None  # "lambda_min" / "lambda_max" once detected

    def state_dict(self) -> dict:
        """Everything ``update``/``observe_val`` remember, as JSON (for checkpoints)."""
        return {"lams": list(self._lams), "in_band": self._in_band, "at_bound": self._at_bound,
                "bound_errs": list(self._bound_errs),
                "best_val": self.best_val, "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                "unreachable": self.unreachable}

    def load_state(self, d: dict) -> None:
        self._lams.clear()
        self._lams.extend(d["lams"])
        self._in_band = d["in_band"]
        self._at_bound, self._bound_errs = d["at_bound"], list(d["bound_errs"])
        self.best_val, self.best_step, self.evals_since_best = d["best_val"], d["best_step"], d["evals_since_best"]
        self.unreachable = d["unreachable"]

    def observe_val(self, step: int, value: float) -> None:
        if self.best_val is None or value < self.best_val - self.cfg.min_delta:
            self.best_val, self.best_step, self.evals_since_best = value, step, 0
        else:
            self.evals_since_best += 1

    def rel_error(self, s_ema: float) -> float:
        return abs(s_ema - self.target) / self.target

    def _track_bound(self, lam: float, err: float) -> None:
        """Unreachable: λ at one bound for W steps, Ŝ off target and no closer than W − 1 steps ago
        (a controller that pins λ while S still closes in, as on a large start-up error, is not stuck)."""
        bound = "lambda_max" if lam >= self.lambda_max else "lambda_min" if lam <= self.lambda_min else None
        if bound is None or err <= self.cfg.s_tolerance:
            self._at_bound, self._bound_errs = None, []
            return
        if bound != self._at_bound:
            self._at_bound, self._bound_errs = bound, []
        self._bound_errs = (self._bound_errs + [err])[-self.cfg.window:]
        if len(self._bound_errs) >= self.cfg.window and err >= self._bound_errs[0]:
            self.unreachable = bound

    def update(self, step: int, lam: float, s_ema: float) -> bool:
        """Record one control step; True when the run has saturated."""
        self._lams.append(lam)
        near = self.rel_error(s_ema) < self.cfg.s_tolerance
        self._in_band = self._in_band + 1 if near else 0
        self._track_bound(lam, self.rel_error(s_ema))
        if not self.cfg.enabled or step < self.cfg.min_steps or len(self._lams) <= self.cfg.window:
            return False
        change = abs(self._lams[-1] - self._lams[0])
        stable = change < self.cfg.lambda_eps * (self._lams[0] if self.cfg.lambda_change == "relative" else 1.0)
        return stable and self._in_band >= self.cfg.window and self._plateau(step)

    def _plateau(self, step: int) -> bool:
        """Validation has stopped improving: see the class docstring."""
        if self.cfg.patience == 0:
            return True
        if self.best_val is None or self.evals_since_best < self.cfg.patience:
            return False
        epoch = self.steps_per_epoch
        if epoch is None or step <= epoch:  # first pass: every batch is new data, no epoch structure yet
            return True
        return step - self.best_step >= self.cfg.patience_epochs * epoch
