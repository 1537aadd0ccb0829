"""PI controllers: hand-stepped traces of both laws, the control period, and closed loops on
a simulated lagged-integrator plant (pure: no MLX)."""

import json
import math
import random

import pytest

from scu_sweep.scu.controller import ControllerConfig, ControllerState, initial_state, step

T = 0.03
# The seed's law (DESIGN §2), EMA off so each step sees the raw S.
SEED = ControllerConfig(law="incremental", error="absolute", smooth="s", control_every=1, kp=0.8, ki=0.15,
                        deadband=0.002, ema_alpha=1.0, leak=0.995, i_min=-0.2, i_max=0.2, lambda_max=10.0)
POS = ControllerConfig(ema_alpha=1.0)  # the default positional law, unsmoothed


def at(state, s, target, cfg):
    """One step whose measurement has S = s exactly (DataBPT 1 − s, ParamBPT s)."""
    return step(state, 1.0 - s, s, target, cfg)


# --- the seed's incremental law ---------------------------------------------------------

def test_seed_above_target_raises_lambda_by_the_pi_formula():
    s = at(ControllerState(lam=1.0), 0.05, T, SEED)
    e = 0.02
    assert s.integral == pytest.approx(0.15 * e)
    assert s.lam == pytest.approx(math.exp(0.8 * e + 0.15 * e))


def test_seed_below_target_lowers_lambda():
    s = at(ControllerState(lam=1.0), 0.01, T, SEED)
    assert s.lam == pytest.approx(math.exp(0.8 * -0.02 + 0.15 * -0.02))


def test_seed_deadband_holds_lambda_and_only_leaks_integral():
    s = at(ControllerState(lam=0.7, integral=0.1), T + 0.0015, T, SEED)
    assert s.lam == 0.7 and s.integral == pytest.approx(0.1 * 0.995)


def test_seed_ema_smooths_s():
    cfg = ControllerConfig(law="incremental", smooth="s", ema_alpha=0.1, deadband=1.0)
    s = at(ControllerState(lam=1.0), 0.10, T, cfg)
    assert s.s_ema == pytest.approx(0.10)  # the first measurement initialises the EMA
    s = at(s, 0.00, T, cfg)
    assert s.s_ema == pytest.approx(0.09)


def test_seed_no_integration_while_at_a_bound_and_pushing_out():
    s = at(ControllerState(lam=10.0, integral=0.05), 0.5, T, SEED)
    assert s.integral == pytest.approx(0.05 * 0.995) and s.lam == 10.0
    s2 = at(ControllerState(lam=10.0, integral=0.05), 0.0, T, SEED)  # inwards integrates again
    assert s2.integral == pytest.approx(0.05 * 0.995 + 0.15 * -0.03)


def test_huge_gains_saturate_at_the_bounds_instead_of_overflowing():
    for law in ("incremental", "positional"):
        cfg = ControllerConfig(law=law, kp=1e300, ki=0.0, deadband=0.0, ema_alpha=1.0)
        assert at(ControllerState(lam=1.0), 0.5, 0.03, cfg).lam == cfg.lambda_max
        assert at(ControllerState(lam=1.0), 1e-9, 0.03, cfg).lam == cfg.lambda_min


# --- the positional law -----------------------------------------------------------------

def test_positional_sets_log_lambda_from_the_error_past_the_dead_zone():
    cfg = ControllerConfig(kp=8.0, ki=0.4, deadband=0.03, ema_alpha=1.0, lambda_init=2.0)
    s = at(initial_state(cfg), 0.033, T, cfg)  # e = +10 %, past the 3 % dead zone: 7 %
    assert s.integral == pytest.approx(0.4 * 0.07)
    assert math.log(s.lam) == pytest.approx(math.log(2.0) + 8.0 * 0.07 + 0.4 * 0.07)
    s = at(s, 0.0303, T, cfg)  # inside the dead zone: the integral holds λ's level
    assert s.integral == pytest.approx(0.4 * 0.07)
    assert math.log(s.lam) == pytest.approx(math.log(2.0) + 0.4 * 0.07)


def test_relative_deadband_steers_a_tiny_target():
    """Target 0.0001 with S = 0.00045: an absolute 0.002 deadband never moves λ; a relative one does."""
    held = at(ControllerState(lam=1.0), 0.00045, 0.0001, SEED)
    assert held.lam == 1.0
    moved = at(initial_state(POS), 0.00045, 0.0001, POS)
    assert moved.lam == POS.lambda_max  # e = +350 %: the strongest prior
    moved = at(initial_state(POS), 0.00009, 0.0001, POS)  # 10 % below
    assert moved.lam < 1.0


def test_integral_takes_the_error_clipped_to_e_max():
    cfg = ControllerConfig(kp=0.0, ki=1.0, deadband=0.0, e_max=0.25, ema_alpha=1.0)
    s = at(initial_state(cfg), 0.09, T, cfg)  # e = +200 %
    assert s.integral == pytest.approx(0.25)


def test_smoothing_data_bpt_leaves_param_bpt_exact():
    cfg = ControllerConfig(smooth="data_bpt", ema_alpha=0.5, fixed=True)
    s = step(initial_state(cfg), 4.0, 0.1, T, cfg)
    s = step(s, 2.0, 0.2, T, cfg)  # D̄ = 3.0, ParamBPT this step's 0.2
    assert s.d_ema == pytest.approx(3.0)
    assert s.s_ema == pytest.approx(0.2 / 3.2)


def test_epoch_smoothing_averages_the_last_window_of_data_bpt():
    cfg = ControllerConfig(smooth="data_bpt_epoch", fixed=True)
    s = initial_state(cfg, steps_per_epoch=3.2)
    for d in (4.0, 2.0, 6.0, 8.0):
        s = step(s, d, 0.1, T, cfg)
    assert s.recent == (2.0, 6.0, 8.0) and s.d_ema == pytest.approx(16 / 3)
    assert s.s_ema == pytest.approx(0.1 / (16 / 3 + 0.1))


@pytest.mark.parametrize("steps_per_epoch,window", [(24.25, 24), (0.4, 1), (1e6, 33), (None, 33)])
def test_the_epoch_window_is_one_epoch_and_at_most_one_over_alpha(steps_per_epoch, window):
    assert initial_state(ControllerConfig(smooth="data_bpt_epoch", ema_alpha=0.03), steps_per_epoch).window == window
    assert initial_state(ControllerConfig(smooth="data_bpt", ema_alpha=0.03), steps_per_epoch).window == 0  # the EMA keeps no window


def test_control_period_moves_lambda_only_every_n_steps():
    cfg = ControllerConfig(law="incremental", error="absolute", smooth="s", control_every=5, ema_alpha=0.5,
                           deadband=0.0)
    s, lams = initial_state(cfg), []
    for _ in range(12):
        s = at(s, 0.05, T, cfg)
        lams.append(s.lam)
    changes = [i + 1 for i in range(12) if lams[i] != (lams[i - 1] if i else cfg.lambda_init)]
    assert changes == [5, 10]
    assert s.s_ema == pytest.approx(0.05) and s.steps == 12  # the EMA runs every step


def test_fixed_keeps_lambda_but_tracks_s():
    cfg = ControllerConfig(fixed=True, lambda_init=3.0, ema_alpha=1.0, smooth="s")
    s = at(initial_state(cfg), 0.5, T, cfg)
    assert s.lam == 3.0 and s.s_ema == pytest.approx(0.5)


def test_state_round_trips_through_a_dict_and_json():
    s = ControllerState(lam=0.5, integral=-0.1, s_ema=0.02, d_ema=3.1, steps=7, window=3, recent=(3.0, 3.1, 3.2))
    assert ControllerState.from_dict(s.to_dict()) == s
    assert ControllerState.from_dict(json.loads(json.dumps(s.to_dict()))) == s  # a checkpoint's round trip
    old = {k: v for k, v in s.to_dict().items() if k not in ("window", "recent")}  # a checkpoint from before the window
    assert ControllerState.from_dict(old) == ControllerState(lam=0.5, integral=-0.1, s_ema=0.02, d_ema=3.1, steps=7)


# --- closed loops on a simulated plant --------------------------------------------------

def simulate(cfg, target, k=0.018, tau=3.0, steps=300, seed=0, drop_at=None, drop=1.0, free_rate=None,
             fall=0.0, steps_per_epoch=None):
    """Lagged integrator, the shape measured on SmolLM2 (README calibration): Adam moves the
    weights at a bounded rate, so d ln ParamBPT/dt = −k·(v − u_eq(t)), v a first-order lag (τ
    steps) of u = ln λ, and u_eq (the λ that holds S still) drifts up as LoRA-B grows. DataBPT
    (4 bits) is measured with ±12 % per-batch noise, as python_docs batches are, and falls to
    ``drop`` × itself from step ``drop_at`` on (training blocks coming round again). With
    ``free_rate``, ParamBPT grows at most that fast (ln per step): LoRA's free growth, which no
    smaller λ speeds up. With ``fall``, DataBPT falls by that much (ln per step) from ``drop_at``
    on (the adapter memorising). Returns the true S, Ŝ and λ per step."""
    rng, st = random.Random(seed), initial_state(cfg, steps_per_epoch)
    x, v, u_eq = math.log(4.0 * 0.0309 / (1 - 0.0309)), math.log(cfg.lambda_init), math.log(0.04)
    s_true, s_hat, lams = [], [], []
    for t in range(steps):
        after = drop_at is not None and t >= drop_at
        d = 4.0 * (drop * math.exp(-fall * (t - drop_at)) if after else 1.0)
        st = step(st, d * (1 + 0.12 * rng.gauss(0, 1)), math.exp(x), target, cfg)
        v += (math.log(st.lam) - v) / tau
        rate = -k * (v - (u_eq + 0.01 * t))
        x += rate if free_rate is None else min(rate, free_rate)
        s_true.append(math.exp(x) / (d + math.exp(x)))
        s_hat.append(st.s_ema)
        lams.append(st.lam)
    return s_true, s_hat, lams


EPOCH = 24.25  # steps per epoch of the default corpus (SmolLM2, 14,000 tokens of python_docs)


@pytest.mark.parametrize("smooth", ["data_bpt_epoch", "data_bpt"])
@pytest.mark.parametrize("target", [0.02, 0.05])
@pytest.mark.parametrize("k,tau", [(0.006, 1.0), (0.018, 3.0), (0.054, 5.0)])
def test_default_law_settles_on_a_lagged_integrator(smooth, target, k, tau):
    """Gains ×1/3 and ×3 around the measured plant, lag 1–5 steps, either D̄: S in ±10 % over the
    last third."""
    trace, _, _ = simulate(ControllerConfig(smooth=smooth), target, k=k, tau=tau, steps_per_epoch=EPOCH)
    last = trace[2 * len(trace) // 3:]
    assert max(abs(s / target - 1) for s in last) < 0.10


@pytest.mark.parametrize("k,tau", [(0.006, 1.0), (0.018, 3.0), (0.054, 5.0)])
def test_the_lambda_floor_keeps_the_integral_out_of_the_free_growth_zone(k, tau):
    """S starts below a 5 % target and ParamBPT grows at most +0.013 ln per step (SmolLM2 at
    λ = 0.01, README calibration; a smaller λ grows it no faster). With λ free down to 1e-4
    the integral winds into that dead zone and λ climbs back late: S overshoots by > 20 %.
    The default floor (1e-2) keeps the overshoot under 12 %."""
    def overshoot(cfg):
        s, _, _ = simulate(cfg, 0.05, k=k, tau=tau, free_rate=0.013, steps_per_epoch=EPOCH)
        crossed = next(i for i, x in enumerate(s) if x >= 0.05)
        return max(s[crossed:]) / 0.05 - 1

    assert ControllerConfig().lambda_min == 1e-2
    assert overshoot(ControllerConfig()) < 0.12
    assert overshoot(ControllerConfig(lambda_min=1e-4)) > 0.20


def test_seed_law_updated_every_step_does_not_settle_on_the_same_plant():
    """The contrast that motivates the default: the double integrator overshoots and swings."""
    seed_every_step = ControllerConfig(law="incremental", error="absolute", smooth="s", control_every=1,
                                       kp=0.8, ki=0.15, deadband=0.002, ema_alpha=0.1, leak=0.995,
                                       i_min=-0.2, i_max=0.2, lambda_max=10.0)
    trace, _, _ = simulate(seed_every_step, 0.05, k=0.018, tau=3.0)
    last = trace[2 * len(trace) // 3:]
    assert max(abs(s / 0.05 - 1) for s in last) > 0.10


@pytest.mark.parametrize("k,tau", [(0.006, 1.0), (0.018, 3.0), (0.054, 5.0)])
def test_a_drop_in_data_bpt_brings_a_lambda_ramp_not_a_spike(k, tau):
    """An epoch boundary: DataBPT falls 20 % at once (repeated blocks). With an EMA D̄ over ~33
    steps (``smooth=data_bpt``, ema_alpha 0.03) λ peaks at well under half the excursion of a
    10-step D̄ (0.1), Ŝ stays within ±10 %, and S is back within ±10 % of the target 100 steps
    later; the default epoch window is back as well."""
    def after_drop(cfg):
        s_true, s_hat, lams = simulate(cfg, 0.03, k=k, tau=tau, drop_at=150, drop=0.8, steps_per_epoch=EPOCH)
        before = sum(lams[130:150]) / 20
        return max(lams[150:220]) / before, s_hat[150:], s_true[250:]
    peak, s_hat, settled = after_drop(ControllerConfig(smooth="data_bpt"))
    peak_fast, _, _ = after_drop(ControllerConfig(smooth="data_bpt", ema_alpha=0.1))
    assert peak < 0.6 * peak_fast
    assert max(abs(s / 0.03 - 1) for s in s_hat) < 0.10
    assert max(abs(s / 0.03 - 1) for s in settled) < 0.10
    _, _, settled = after_drop(ControllerConfig())
    assert max(abs(s / 0.03 - 1) for s in settled) < 0.10


@pytest.mark.parametrize("k,tau", [(0.006, 1.0), (0.018, 3.0), (0.054, 5.0)])
def test_the_epoch_window_follows_a_falling_data_bpt_with_half_the_lag(k, tau):
    """Memorisation: DataBPT falls 0.5 % per step from step 150. D̄ lags it, so the true S runs
    above the target by about lag × 0.5 %: ~12 steps (half an epoch of 24) for the default epoch
    window, ~33 for the EMA. Mean excess over the last 100 steps: < 10 % with the window, more
    than twice that with the EMA."""
    def excess(cfg):
        s_true, _, _ = simulate(cfg, 0.03, k=k, tau=tau, drop_at=150, fall=0.005, steps_per_epoch=EPOCH)
        return sum(s / 0.03 - 1 for s in s_true[200:]) / 100

    window = excess(ControllerConfig())
    ema = excess(ControllerConfig(smooth="data_bpt"))
    assert 0 < window < 0.10 and ema > 2 * window
