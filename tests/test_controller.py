"""PI controller: hand-stepped traces of DESIGN §2's update rule."""

import math

import pytest

from scu_sweep.controller import ControllerConfig, ControllerState, initial_state, step

CFG = ControllerConfig(kp=0.8, ki=0.15, deadband=0.002, ema_alpha=1.0, leak=0.995)
T = 0.03


def test_above_target_raises_lambda_by_the_pi_formula():
    s = step(ControllerState(lam=1.0), 0.05, T, CFG)
    e = 0.02
    assert s.integral == pytest.approx(0.15 * e)
    assert s.lam == pytest.approx(math.exp(0.8 * e + 0.15 * e))
    assert s.lam > 1.0


def test_below_target_lowers_lambda():
    s = step(ControllerState(lam=1.0), 0.01, T, CFG)
    assert s.lam == pytest.approx(math.exp(0.8 * -0.02 + 0.15 * -0.02))
    assert s.lam < 1.0


def test_deadband_holds_lambda_and_only_leaks_integral():
    s = step(ControllerState(lam=0.7, integral=0.1), T + 0.0015, T, CFG)
    assert s.lam == 0.7
    assert s.integral == pytest.approx(0.1 * 0.995)


def test_ema_smooths_s():
    cfg = ControllerConfig(ema_alpha=0.1, deadband=1.0)  # deadband: λ frozen, EMA visible
    s = step(ControllerState(lam=1.0), 0.10, T, cfg)
    assert s.s_ema == 0.10  # first measurement initialises the EMA
    s = step(s, 0.00, T, cfg)
    assert s.s_ema == pytest.approx(0.09)


def test_bounds_hold():
    cfg = ControllerConfig(kp=50.0, ki=0.0, ema_alpha=1.0, lambda_min=0.1, lambda_max=2.0)
    assert step(ControllerState(lam=1.9), 0.9, T, cfg).lam == 2.0
    assert step(ControllerState(lam=0.2), 0.0, T, cfg).lam == 0.1


def test_no_integration_while_at_a_bound_and_pushing_out():
    cfg = ControllerConfig(kp=0.8, ki=0.15, ema_alpha=1.0, lambda_max=2.0)
    s = step(ControllerState(lam=2.0, integral=0.05), 0.5, T, cfg)
    assert s.integral == pytest.approx(0.05 * 0.995)  # leaked, not integrated
    assert s.lam == 2.0
    # Coming back inwards integrates again.
    s2 = step(ControllerState(lam=2.0, integral=0.05), 0.0, T, cfg)
    assert s2.integral == pytest.approx(0.05 * 0.995 + 0.15 * -0.03)


def test_integral_is_clamped():
    cfg = ControllerConfig(ki=10.0, ema_alpha=1.0, i_max=0.2, lambda_max=1e9)
    s = step(ControllerState(lam=1.0), 0.5, T, cfg)
    assert s.integral == 0.2


def test_leak_decays_integral_each_step():
    s = ControllerState(lam=1.0, integral=0.1)
    for _ in range(10):
        s = step(s, T, T, CFG)  # inside deadband
    assert s.integral == pytest.approx(0.1 * 0.995**10)


def test_zero_gains_keep_lambda():
    cfg = ControllerConfig(kp=0.0, ki=0.0, ema_alpha=1.0)
    s = initial_state(cfg)
    for v in (0.5, 0.0, 0.2):
        s = step(s, v, T, cfg)
    assert s.lam == cfg.lambda_init


def test_fixed_keeps_lambda_but_tracks_s():
    cfg = ControllerConfig(fixed=True, lambda_init=3.0, ema_alpha=1.0)
    s = step(initial_state(cfg), 0.5, T, cfg)
    assert s.lam == 3.0 and s.s_ema == 0.5


def test_state_round_trips_through_a_dict():
    s = ControllerState(lam=0.5, integral=-0.1, s_ema=0.02)
    assert ControllerState.from_dict(s.to_dict()) == s


def test_closed_loop_converges_on_a_plant():
    """S = a / (a + 1/λ-ish) plant: the controller drives Ŝ to the target."""
    cfg = ControllerConfig(ema_alpha=0.5, lambda_min=1e-4, lambda_max=10.0)
    s = initial_state(cfg)
    for _ in range(400):
        plant_s = 0.08 / (1.0 + 2.0 * s.lam)  # more λ -> smaller weights -> smaller S
        s = step(s, plant_s, T, cfg)
    assert abs(s.s_ema - T) <= cfg.deadband + 1e-3
    # 0.08 / (1 + 2λ) inside T ± deadband  <=>  λ in [0.75, 0.929]
    lo, hi = (0.08 / (T + cfg.deadband) - 1) / 2, (0.08 / (T - cfg.deadband) - 1) / 2
    assert lo - 0.02 < s.lam < hi + 0.02


def test_huge_gains_saturate_at_the_bounds_instead_of_overflowing():
    cfg = ControllerConfig(kp=1e300, ki=0.0, deadband=0.0)
    st = step(ControllerState(lam=1.0, s_ema=0.5), 0.5, 0.03, cfg)
    assert st.lam == cfg.lambda_max
    st = step(ControllerState(lam=1.0, s_ema=0.0), 0.0, 0.03, cfg)
    assert st.lam == cfg.lambda_min
