"""The MDL penalty reaches the gradient: ∂/∂w [λ·Σw²/(2σ²N)] = λ·w/(σ²N) (DESIGN §2)."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from scu_sweep.scu import mdl
from scu_sweep.models.lora import apply_lora, sum_sq
from scu_sweep.training.loop import make_optimizer, make_train_step

from conftest import compose_cfg

SIGMA, N = 0.05, 5000


@pytest.fixture(scope="module")
def tiny():
    from scu_sweep.models import load as models

    cfg = compose_cfg(["model=tiny", "logger=none"])
    mx.random.seed(0)
    model, _, _ = models.load(cfg.model)
    apply_lora(model, cfg.lora)
    # lora_b starts at zero: give every adapter weight a non-zero value.
    leaves = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1) for k, v in leaves]))
    return model


def test_penalty_gradient_is_lambda_w_over_sigma2_n(tiny):
    lam = 0.37
    coef = mdl.penalty_coef(SIGMA, N)

    def penalty(model):
        return lam * coef * sum_sq(model.trainable_parameters())

    grads = dict(tree_flatten(nn.value_and_grad(tiny, penalty)(tiny)[1]))
    params = dict(tree_flatten(tiny.trainable_parameters()))
    assert set(grads) == set(params) and len(params) > 0
    for k, w in params.items():
        np.testing.assert_allclose(np.array(grads[k]), lam * np.array(w) / (SIGMA**2 * N), rtol=1e-5, atol=1e-9)


def test_lambda_changes_between_calls_of_one_compiled_step(tiny):
    """One compiled step, two λ values on the same batch and weights (SGD, lr 1):
    the updates differ by exactly the penalty's gradient, so λ is not a traced constant."""
    x = mx.array(np.random.default_rng(1).integers(0, 200, size=(2, 9)), dtype=mx.int32)
    snapshot = [(k, mx.array(v)) for k, v in tree_flatten(tiny.trainable_parameters())]
    opt = optim.SGD(learning_rate=1.0)
    step = make_train_step(tiny, opt, mdl.penalty_coef(SIGMA, N))
    results = []
    for lam in (0.0, 2.0):
        tiny.update(tree_unflatten(snapshot))
        mx.eval(step(x[:, :-1], x[:, 1:], mx.array(lam)))
        results.append({k: np.array(v) for k, v in tree_flatten(tiny.trainable_parameters())})
    k = next(iter(results[0]))
    w0 = np.array(dict(snapshot)[k])
    np.testing.assert_allclose(results[1][k] - results[0][k], -2.0 * w0 / (SIGMA**2 * N), rtol=1e-3, atol=1e-6)


def test_optimizer_has_no_weight_decay():
    cfg = compose_cfg(["model=tiny"])
    assert make_optimizer(cfg.train).weight_decay == 0.0
