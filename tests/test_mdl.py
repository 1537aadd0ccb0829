import math

import pytest

from scu_sweep.scu import mdl


def test_formulas():
    ce, ssq, sigma, n = 2.0, 50.0, 0.1, 1000
    assert mdl.data_bpt(ce) == pytest.approx(2.0 / math.log(2))
    assert mdl.param_bpt(ssq, sigma, n) == pytest.approx(50.0 / (2 * 0.01 * 1000 * math.log(2)))
    d, p = mdl.data_bpt(ce), mdl.param_bpt(ssq, sigma, n)
    assert mdl.s_ratio(d, p) == pytest.approx(p / (d + p))
    assert mdl.objective(ce, ssq, 0.5, sigma, n) == pytest.approx(2.0 + 0.5 * 50.0 / (2 * 0.01 * 1000))


def test_penalty_in_bits_is_param_bpt_times_lambda():
    coef = mdl.penalty_coef(0.05, 12345)
    assert 3.0 * 7.0 * coef / mdl.LN2 == pytest.approx(3.0 * mdl.param_bpt(7.0, 0.05, 12345))
