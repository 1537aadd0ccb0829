"""MDL quantities of DESIGN §2 (bits per token).

Plain arithmetic: works unchanged on Python floats and on MLX scalars, so the
training step uses the same formulas as the tests.
"""

from __future__ import annotations

import math

LN2 = math.log(2.0)


def penalty_coef(sigma: float, n_tokens: int) -> float:
    """1/(2σ²N): multiplies Σw² to give the prior's cost in nats per training token."""
    return 1.0 / (2.0 * sigma * sigma * n_tokens)


def data_bpt(ce_nats):
    """DataBPT = CE / ln 2 (CE: mean next-token cross-entropy, nats)."""
    return ce_nats / LN2


def param_bpt(sum_sq, sigma: float, n_tokens: int):
    """ParamBPT = Σw² / (2σ²N ln 2)."""
    return sum_sq * penalty_coef(sigma, n_tokens) / LN2


def s_ratio(data_bits, param_bits):
    """S = ParamBPT / (DataBPT + ParamBPT)."""
    return param_bits / (data_bits + param_bits)


def objective(ce_nats, sum_sq, lam, sigma: float, n_tokens: int):
    """Training loss in nats per token: CE + λ·Σw²/(2σ²N)."""
    return ce_nats + lam * sum_sq * penalty_coef(sigma, n_tokens)
