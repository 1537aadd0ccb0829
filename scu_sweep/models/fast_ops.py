"""Element-wise CPU hot spots of a Llama-type step, from ops that ``mx.compile`` fuses.

On CPU, MLX runs element-wise math on one thread, and its ``exp`` costs ~10 ns per
element (a scalar polynomial making six ``fmaf`` library calls).

* **exp from fusable ops.** ``exp`` is the Cephes polynomial MLX itself uses
  (``2**n * p(f)``, ``n = round(x log2 e)``, ``|f| <= 1/2``), written as multiply/add,
  an int32 shift and a bit-cast, which ``mx.compile`` fuses into vectorised loops:
  ~1.3 ns per element, the same ~1e-6 relative accuracy.

The same ``exp`` also serves the two other element-wise hot spots of a Llama-type
step on CPU, through :func:`install_fast_ops`: the MLP's SwiGLU (``silu(gate) * up``,
~11 ms per layer and step with MLX's sigmoid) and the attention softmax; together
~0.3 s of a 1.8 s step, same values to float32 rounding.

:func:`install_fast_ops` puts them into a loaded model (``scu_sweep.models.load.load`` does, on CPU); the
cross-entropy of the training step (``scu_sweep.training.losses``) uses the same ``exp``.
"""

from __future__ import annotations

import sys

import mlx.core as mx

LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds t to the nearest integer
# 2**f on [-1/2, 1/2] (Cephes, as in mlx/backend/cpu/simd/math.h), lowest order first
_P = (1.0, 6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2,
      9.618437357674640e-3, 1.339887440266574e-3, 1.535336188319500e-4)


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (larger x overflow) in ops that ``mx.compile`` fuses.

    Below x = -88 (2**-127) the result is 0, as with MLX's ``exp``.
    """
    t = mx.maximum(x * LOG2E, -127.0)
    n = (t + _ROUND) - _ROUND
    f = t - n
    f2 = f * f
    p = (_P[0] + _P[1] * f) + f2 * ((_P[2] + _P[3] * f) + f2 * ((_P[4] + _P[5] * f) + f2 * _P[6]))
    two_n = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)  # 2**n; 0.0 at n = -127
    return two_n * p


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


@mx.compile  # fused when called outside a compiled step too (View rules out shapeless)
def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + exp(-x)) from :func:`exp_nonpositive` of -|x| (exact in both tails)."""
    e = exp_nonpositive(-mx.abs(x))
    r = 1.0 / (1.0 + e)
    return mx.where(x >= 0, r, e * r)


@mx.custom_function
def _swiglu(gate: mx.array, x: mx.array):
    sig = sigmoid(gate)
    return gate * sig * x, sig


@_swiglu.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    """d/dgate silu(gate) = sig * (1 + gate * (1 - sig)); the forward's sigmoid is reused."""
    gate, x = primals
    dout = cotangents[0]
    sig = outputs[1]
    return dout * x * sig * (1.0 + gate * (1.0 - sig)), dout * (gate * sig)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``nn.silu(gate) * x`` (mlx-lm's ``swiglu``), float32 on CPU."""
    if not on_cpu() or gate.dtype != mx.float32 or x.dtype != mx.float32:
        from mlx_lm.models.activations import swiglu as mlx_lm_swiglu  # lazy: mlx_lm imports transformers

        return mlx_lm_swiglu(gate, x)
    return _swiglu(gate, x)[0]


@mx.custom_function
def _softmax(scores: mx.array) -> mx.array:
    m = mx.max(scores, axis=-1, keepdims=True)
    e = exp_nonpositive(scores - m)
    return e * (1.0 / mx.sum(e, axis=-1, keepdims=True))


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


def scaled_dot_product_attention(queries, keys, values, cache=None, scale: float = 1.0, mask=None, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention`` (multi-/grouped-query, ``mask`` None or
    "causal") with the softmax on :func:`exp_nonpositive`; anything else (a KV cache,
    an array mask, sinks, a GPU, half precision) goes to mlx-lm's own."""
    plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
    if cache is not None or sinks is not None or not plain_mask or not on_cpu() or queries.dtype != mx.float32:
        from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_sdpa  # lazy, as above

        return mlx_lm_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    B, n_q, L, D = queries.shape
    n_kv, L_k = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, n_kv, n_q // n_kv, L, D)  # query head h uses kv head h // (n_q / n_kv)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    if mask == "causal":
        keep = mx.arange(L_k)[None] <= mx.arange(L_k - L, L_k)[:, None]
        scores = mx.where(keep, scores, -mx.inf)
    return (_softmax(scores) @ values[:, :, None]).reshape(B, n_q, L, values.shape[-1])


def install_fast_ops(model) -> list:
    """Route the SwiGLU and attention of ``model``'s mlx-lm module through this module.

    Replaces the module globals ``swiglu`` and ``scaled_dot_product_attention`` of
    ``type(model).__module__`` (e.g. ``mlx_lm.models.llama``), but only where they are
    still mlx-lm's own functions, so every model of that class in this process uses
    them; the replacements hand GPU and float16/bfloat16 inputs back to mlx-lm. Returns
    ``[(module, name, original), ...]`` for what it replaced (to undo it).
    """
    from mlx_lm.models import activations, base  # lazy: mlx_lm imports transformers

    module = sys.modules.get(type(model).__module__)
    replaced = []
    for name, original, fast in (
        ("swiglu", activations.swiglu, swiglu),
        ("scaled_dot_product_attention", base.scaled_dot_product_attention, scaled_dot_product_attention),
    ):
        if module is not None and getattr(module, name, None) is original:
            setattr(module, name, fast)
            replaced.append((module, name, original))
    return replaced
