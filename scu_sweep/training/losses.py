"""Cross-entropy for the training step, with as little work besides the BLAS as possible.

On CPU, MLX runs element-wise math on one thread, and its ``exp`` costs ~10 ns per
element (a scalar polynomial making six ``fmaf`` library calls). For the output head
of the SCU step (512 rows x 49,152 classes) ``nn.losses.cross_entropy`` therefore
costs more than the head's matmuls: ~0.58 s of CPU time per step, measured against a
step whose loss is a plain mean of the logits. :func:`causal_lm_loss` brings that to
~0.02 s; value and gradient are the same to float32 rounding. What it changes:

* **exp from fusable ops** (``models/fast_ops.py``): ~1.3 ns per element instead of ~10.
* **Custom VJPs.** Autodiff of the reference runs max, subtract, logsumexp and the
  gather backwards, i.e. ``exp`` over all logits a second time plus several
  logits-sized temporaries. Here the forward keeps what the backward needs.
* **Head and loss together, over blocks of the vocabulary** (:func:`head_cross_entropy`).
  Each block of ~2 MB of logits is made by one matmul, reduced to a row max and sum
  while it is in cache, and its ``exp`` is kept; the softmax rows are combined with
  the blocks' maxima at the end. Since the logits' gradient is ``softmax - onehot``,
  the hidden states' gradient is ``Σ_blocks (exp_block @ W_block) * scale - W[y]``:
  matmuls only, no element-wise pass over the logits in the backward, and no
  100 MB logits or logits-gradient array (each costs ~40 ms per pass here, mostly
  page faults on fresh memory).

:func:`cross_entropy` is the same idea for logits that are already materialised
(row blocks, recomputing ``exp`` in the backward). On a GPU (Metal, CUDA) both defer
to ``nn.losses.cross_entropy``, which has a fused kernel there.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models.fast_ops import exp_nonpositive, on_cpu

_ROW_BLOCK_BYTES = 512 * 1024  # cross_entropy: logits per row block
_VOCAB_BLOCK_BYTES = 2 * 1024 * 1024  # head_cross_entropy: logits per vocabulary block
_MAX_BLOCKS = 512  # bounds the traced graph
# mlx-lm causal LMs whose __call__ is exactly head(self.model(inputs)), the head being
# model.lm_head or, with tie_word_embeddings, model.model.embed_tokens.as_linear
_PLAIN_HEAD_MODULES = {
    f"mlx_lm.models.{name}" for name in ("llama", "olmo2", "olmo3", "qwen2", "qwen3", "phi3")
}


def _reduce(loss: mx.array, reduction: str, shape) -> mx.array:
    if reduction == "mean":
        return mx.mean(loss)
    if reduction == "sum":
        return mx.sum(loss)
    return loss.reshape(shape)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


# --- logits given: row blocks ---------------------------------------------------------


def _rows_per_block(n_rows: int, vocab: int) -> int:
    rows = max(1, _ROW_BLOCK_BYTES // (4 * vocab))
    return max(rows, -(-n_rows // _MAX_BLOCKS))


@mx.custom_function
def _ce_rows(logits: mx.array, targets: mx.array):
    """Per-row CE of (R, V) float32 logits; also the row maxima and log-sums."""
    n_rows, vocab = logits.shape
    block = _rows_per_block(n_rows, vocab)
    maxima, sums = [], []
    for i in range(0, n_rows, block):
        rows = logits[i:i + block]
        m = mx.max(rows, axis=-1, keepdims=True)
        maxima.append(m)
        sums.append(mx.sum(exp_nonpositive(rows - m), axis=-1, keepdims=True))
    m = mx.concatenate(maxima)
    log_s = mx.log(mx.concatenate(sums))
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (log_s - (picked - m)).squeeze(-1), m, log_s


@_ce_rows.vjp
def _ce_rows_vjp(primals, cotangents, outputs):
    """d CE_r / d logits_rv = softmax_rv - [v = y_r], times the row's cotangent."""
    logits, targets = primals
    n_rows, vocab = logits.shape
    g = cotangents[0][:, None]
    _, m, log_s = outputs
    y = targets[:, None]
    classes = mx.arange(vocab, dtype=targets.dtype)
    block = _rows_per_block(n_rows, vocab)
    parts = []
    for i in range(0, n_rows, block):
        b = slice(i, i + block)
        g_b = g[b]
        probs = exp_nonpositive((logits[b] - m[b]) - log_s[b])
        parts.append(probs * g_b - mx.where(classes == y[b], g_b, 0.0))
    return mx.concatenate(parts), mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array, reduction: str = "mean") -> mx.array:
    """``nn.losses.cross_entropy`` for class-index targets, in nats, logits taken in float32.

    ``logits`` (..., V), ``targets`` (...); ``reduction`` "mean" (default), "sum" or
    "none". Value and gradient match ``nn.losses.cross_entropy(logits.astype(mx.float32),
    targets)`` to float32 rounding; works inside ``mx.compile`` and ``value_and_grad``.
    """
    _check_reduction(reduction)
    logits = logits.astype(mx.float32)
    if not on_cpu():
        return nn.losses.cross_entropy(logits, targets, reduction=reduction)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match logits shape {logits.shape}")
    vocab = logits.shape[-1]
    loss = _ce_rows(logits.reshape(-1, vocab), targets.reshape(-1))[0]
    return _reduce(loss, reduction, targets.shape)


# --- head and loss together: vocabulary blocks ----------------------------------------


def _vocab_block(n_rows: int, vocab: int) -> int:
    cols = max(256, _VOCAB_BLOCK_BYTES // (4 * max(n_rows, 1)) // 256 * 256)
    return min(vocab, max(cols, -(-vocab // _MAX_BLOCKS)))


@mx.custom_function
def _head_ce_rows(hidden: mx.array, weight: mx.array, targets: mx.array):
    """Per-row CE of logits hidden @ weight.T, (R, D) x (V, D), never forming all logits.

    Extra outputs for the backward: ``scale`` (R, n_blocks) = exp(block max - row max)
    / row sum, and each block's exp(logits - block max).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    cols = _vocab_block(n_rows, vocab)
    maxima, sums, exps = [], [], []
    for j in range(0, vocab, cols):
        logits = (hidden @ weight[j:j + cols].T).astype(mx.float32)
        m = mx.max(logits, axis=-1, keepdims=True)
        e = exp_nonpositive(logits - m)
        maxima.append(m)
        sums.append(mx.sum(e, axis=-1, keepdims=True))
        exps.append(e)
    block_max = mx.concatenate(maxima, axis=-1)  # (R, n_blocks)
    m = mx.max(block_max, axis=-1, keepdims=True)
    rel = mx.exp(block_max - m)  # small: R x n_blocks
    s = mx.sum(mx.concatenate(sums, axis=-1) * rel, axis=-1, keepdims=True)
    picked = mx.sum((hidden * weight[targets]).astype(mx.float32), axis=-1, keepdims=True)
    loss = (mx.log(s) - (picked - m)).squeeze(-1)
    return (loss, rel / s, *exps)


@_head_ce_rows.vjp
def _head_ce_rows_vjp(primals, cotangents, outputs):
    """With P = softmax(logits): dlogits = (P - onehot) * g, so
    dhidden = Σ_j (E_j @ W_j) * (scale_j * g) - W[y] * g and dweight = dlogits.T @ hidden."""
    hidden, weight, targets = primals
    g = cotangents[0][:, None]
    _, scale, *exps = outputs
    coef = scale * g  # (R, n_blocks)
    cols = exps[0].shape[-1]
    y = targets[:, None]
    d_hidden = -(weight[targets] * g)
    d_weight = []
    for k, e in enumerate(exps):
        j = k * cols
        w_j = weight[j:j + e.shape[-1]]
        c = coef[:, k:k + 1]
        d_hidden = d_hidden + (e @ w_j) * c
        # only evaluated when the head is trained (it is frozen under LoRA)
        classes = mx.arange(j, j + e.shape[-1], dtype=targets.dtype)
        d_weight.append((e * c - mx.where(classes == y, g, 0.0)).T @ hidden)
    return (d_hidden.astype(hidden.dtype), mx.concatenate(d_weight).astype(weight.dtype),
            mx.zeros_like(targets))


def head_cross_entropy(hidden: mx.array, weight: mx.array, targets: mx.array,
                       reduction: str = "mean") -> mx.array:
    """Cross-entropy of the logits ``hidden @ weight.T`` without materialising them.

    ``hidden`` (..., D), ``weight`` (V, D) (an output head without bias, or tied
    embeddings), ``targets`` (...). Same value and gradients (for ``hidden`` and
    ``weight``) as ``cross_entropy(hidden @ weight.T, targets, reduction)`` to float32
    rounding; works inside ``mx.compile`` and ``value_and_grad``.
    """
    _check_reduction(reduction)
    if not on_cpu():
        return nn.losses.cross_entropy((hidden @ weight.T).astype(mx.float32), targets, reduction=reduction)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match hidden shape {hidden.shape}")
    loss = _head_ce_rows(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1))[0]
    return _reduce(loss, reduction, targets.shape)


def output_head(model):
    """The (V, D) weight of an mlx-lm causal LM whose logits are ``model.model(x) @ W.T``.

    None for any other model (another architecture, a quantized or biased head),
    which then goes through its own ``__call__``.
    """
    body = getattr(model, "model", None)
    if type(model).__module__ not in _PLAIN_HEAD_MODULES or not isinstance(body, nn.Module):
        return None
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        head = getattr(body, "embed_tokens", None)
        return head.weight if type(head) is nn.Embedding else None
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear and "bias" not in head:
        return head.weight
    return None


def causal_lm_loss(model, inputs: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy in nats of an mlx-lm causal LM (fp32 logits).

    Equal to ``nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets,
    reduction="mean")``; on CPU the output head and the loss are fused
    (:func:`head_cross_entropy`) when :func:`output_head` knows the model.
    """
    weight = output_head(model) if on_cpu() else None
    if weight is None:
        return cross_entropy(model(inputs), targets)
    return head_cross_entropy(model.model(inputs), weight, targets)
