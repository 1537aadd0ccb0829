"""scu_sweep.training.losses and scu_sweep.models.fast_ops: the same value and gradients as MLX's cross-entropy (DESIGN §2: the
training loss is CE + λ·Σw²/(2σ²N), so the CE's gradient must be exact too)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from scu_sweep.training import losses
from scu_sweep.models import fast_ops
from scu_sweep.models.lora import sum_sq

RTOL = 1e-5


def ref_ce(logits, targets, reduction="mean"):
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction=reduction)


def rel_err(a, b):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_logits(shape, scale, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * scale + rng.normal(size=shape[:-1] + (1,)) * scale
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    return mx.array(logits.astype(np.float32)), mx.array(targets.astype(np.int32))


def test_exp_nonpositive_matches_exp():
    """As accurate as MLX's own exp (the same polynomial; float32 rounding of x·log2 e
    dominates near -87), and 0 where that underflows."""
    x = np.concatenate([-np.logspace(-8, np.log10(87.0), 20001), [0.0, -88.5, -100.0, -1e30, -np.inf]])
    x = mx.array(x.astype(np.float32))
    got = np.array(mx.compile(fast_ops.exp_nonpositive)(x), dtype=np.float64)
    mlx_exp = np.array(mx.exp(x), dtype=np.float64)
    exact = np.exp(np.array(x, dtype=np.float64))
    live = exact > 1e-37
    np.testing.assert_allclose(got[live], mlx_exp[live], rtol=1e-6)
    np.testing.assert_allclose(got[live], exact[live], rtol=5e-6)
    assert np.all(got[~live] < 1e-37) and np.all(got[-4:] == 0) and np.all(got >= 0)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_value_and_gradient(scale, reduction):
    logits, targets = random_logits((3, 7, 1031), scale)
    cot = mx.array(np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32))

    def weighted(fn):
        def f(x):
            out = fn(x, targets, reduction)
            return mx.sum(out * cot) if reduction == "none" else out
        return f

    value, grad = mx.value_and_grad(weighted(losses.cross_entropy))(logits)
    ref_value, ref_grad = mx.value_and_grad(weighted(ref_ce))(logits)
    assert rel_err(value, ref_value) < RTOL
    assert rel_err(grad, ref_grad) < RTOL
    if reduction == "none":
        assert losses.cross_entropy(logits, targets, "none").shape == targets.shape


def test_cross_entropy_rows_far_apart_and_many_blocks(monkeypatch):
    """Rows whose logits differ by 1e4: each row needs its own shift. Row blocks of 2 rows
    plus a ragged last block."""
    monkeypatch.setattr(losses, "_ROW_BLOCK_BYTES", 2 * 4 * 777)
    logits, targets = random_logits((9, 777), 5.0, seed=2)
    logits = logits + mx.array(np.linspace(-1e4, 1e4, 9, dtype=np.float32))[:, None]
    value, grad = mx.value_and_grad(lambda x: losses.cross_entropy(x, targets))(logits)
    ref_value, ref_grad = mx.value_and_grad(lambda x: ref_ce(x, targets))(logits)
    assert rel_err(value, ref_value) < RTOL
    assert rel_err(grad, ref_grad) < RTOL


def test_cross_entropy_under_compile_and_value_and_grad():
    logits, targets = random_logits((4, 16, 300), 3.0, seed=3)
    f = lambda x: losses.cross_entropy(x, targets)  # noqa: E731
    eager = mx.value_and_grad(f)(logits)
    compiled = mx.compile(mx.value_and_grad(f))(logits)
    ref = mx.value_and_grad(lambda x: ref_ce(x, targets))(logits)
    for got in (eager, compiled):
        assert rel_err(got[0], ref[0]) < RTOL
        assert rel_err(got[1], ref[1]) < RTOL


@pytest.mark.parametrize("scale", [0.02, 1.0, 30.0])
def test_head_cross_entropy_matches_logits_path(scale, monkeypatch):
    """Several vocabulary blocks (the last one ragged); gradients for hidden and weight."""
    monkeypatch.setattr(losses, "_VOCAB_BLOCK_BYTES", 4 * 37 * 256)
    rng = np.random.default_rng(4)
    hidden = mx.array(rng.normal(size=(37, 48)).astype(np.float32))
    weight = mx.array((rng.normal(size=(1500, 48)) * scale).astype(np.float32))
    targets = mx.array(rng.integers(0, 1500, size=37).astype(np.int32))
    assert losses._vocab_block(37, 1500) == 256

    def new(h, w):
        return losses.head_cross_entropy(h, w, targets)

    def ref(h, w):
        return ref_ce(h @ w.T, targets)

    (v, (gh, gw)) = mx.compile(mx.value_and_grad(new, argnums=(0, 1)))(hidden, weight)
    (rv, (rgh, rgw)) = mx.value_and_grad(ref, argnums=(0, 1))(hidden, weight)
    assert rel_err(v, rv) < RTOL
    assert rel_err(gh, rgh) < RTOL
    assert rel_err(gw, rgw) < RTOL


def tiny_llama(tied: bool):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
        tie_word_embeddings=tied,
    )
    mx.random.seed(5)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_loss_in_a_compiled_scu_step(tied):
    """The loss as the training step uses it: CE + λ·coef·Σw² under value_and_grad and
    mx.compile, against the same objective with MLX's cross-entropy."""
    model = tiny_llama(tied)
    assert losses.output_head(model) is not None
    x = mx.array(np.random.default_rng(6).integers(0, 300, size=(2, 17)).astype(np.int32))
    lam, coef = mx.array(0.7), 0.05

    def objective(ce_fn):
        def loss_fn(model, x, y):
            return ce_fn(model, x, y) + lam * coef * sum_sq(model.trainable_parameters())
        return nn.value_and_grad(model, loss_fn)

    loss_and_grad = objective(losses.causal_lm_loss)
    new = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=model.state, outputs=model.state)
    value, grads = new(x[:, :-1], x[:, 1:])
    ref_value, ref_grads = objective(lambda m, x, y: ref_ce(m(x), y))(model, x[:, :-1], x[:, 1:])
    assert rel_err(value, ref_value) < RTOL
    grads, ref_grads = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-4, k


def test_output_head_only_for_known_plain_heads():
    assert losses.output_head(nn.Linear(4, 4)) is None
    model = tiny_llama(tied=False)
    model.lm_head = nn.QuantizedLinear(32, 300, bias=False, group_size=32)
    assert losses.output_head(model) is None  # quantized: the model's own __call__
    x = mx.array(np.arange(8, dtype=np.int32)[None])
    ref = ref_ce(model(x[:, :-1]), x[:, 1:])
    assert rel_err(losses.causal_lm_loss(model, x[:, :-1], x[:, 1:]), ref) < RTOL


def test_swiglu_and_attention_match_mlx_lm():
    from mlx_lm.models.activations import swiglu as ref_swiglu

    rng = np.random.default_rng(7)
    arr = lambda *shape, s=1.0: mx.array((rng.normal(size=shape) * s).astype(np.float32))  # noqa: E731
    gate, up, cot = arr(2, 9, 40, s=6.0), arr(2, 9, 40), arr(2, 9, 40)
    gate = mx.concatenate([gate, mx.array([[[-100.0, -30.0, 0.0, 30.0, 100.0]] * 9] * 2)], axis=-1)
    up, cot = mx.pad(up, [(0, 0), (0, 0), (0, 5)], constant_values=1.0), mx.pad(cot, [(0, 0), (0, 0), (0, 5)], constant_values=1.0)
    out, grads = mx.vjp(mx.compile(fast_ops.swiglu), [gate, up], [cot])
    ref_out, ref_grads = mx.vjp(ref_swiglu, [gate, up], [cot])
    assert rel_err(out[0], ref_out[0]) < RTOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < RTOL

    q, k, v = arr(2, 6, 11, 8), arr(2, 2, 11, 8), arr(2, 2, 11, 8)
    cot = arr(2, 6, 11, 8)
    for mask in ("causal", None):
        def new(q, k, v):
            return fast_ops.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

        def ref(q, k, v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

        out, grads = mx.vjp(mx.compile(new), [q, k, v], [cot])
        ref_out, ref_grads = mx.vjp(ref, [q, k, v], [cot])
        assert rel_err(out[0], ref_out[0]) < RTOL
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < RTOL
    array_mask = mx.array(rng.random((11, 11)) > 0.3) | mx.eye(11, dtype=mx.bool_)  # handed to mlx-lm
    got = fast_ops.scaled_dot_product_attention(q, k, v, scale=0.35, mask=array_mask)
    assert rel_err(got, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=array_mask)) < RTOL


def test_install_fast_ops_keeps_loss_and_gradients(monkeypatch):
    model = tiny_llama(tied=True)
    x = mx.array(np.random.default_rng(8).integers(0, 300, size=(2, 17)).astype(np.int32))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: losses.causal_lm_loss(m, x, y))
    ref_value, ref_grads = loss_and_grad(model, x[:, :-1], x[:, 1:])
    for name in ("swiglu", "scaled_dot_product_attention"):
        monkeypatch.setattr(llama, name, getattr(llama, name))  # restored after the test
    replaced = fast_ops.install_fast_ops(model)
    assert [name for _, name, _ in replaced] == ["swiglu", "scaled_dot_product_attention"]
    assert llama.swiglu is fast_ops.swiglu and fast_ops.install_fast_ops(model) == []
    step = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=model.state, outputs=model.state)
    value, grads = step(x[:, :-1], x[:, 1:])
    assert rel_err(value, ref_value) < RTOL
    grads, ref_grads = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < 1e-4, k
