"""Two CBLAS libraries on the SCU step's matmuls, timed in alternation in one process.

This machine's speed moves by tens of percent within minutes, so two libraries timed in
separate runs cannot be compared. Here both are loaded (``RTLD_LOCAL``, side by side)
and each round times one library and then the other on the fp32 ``cblas_sgemm`` shapes of
a SmolLM2-135M LoRA step (batch 4 x 128 tokens: every projection forward and its input
gradient, and the fused head's vocabulary blocks), weighted by how often a step calls them:

    python benchmarks/bench_blas.py LIB_A LIB_B [--threads 1] [--rounds 40]

e.g. the OpenBLAS that ``scu_sweep.training.backend`` preloads against the ``mkl`` wheel's
``libmkl_rt.so.3``. Prints each library's median GFLOP/s and the median and 10-90 % range of
the per-round ratio B / A.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np
from bench_step import MODEL  # the SmolLM2-135M shape bench_step.py times

ROWS = 4 * 128  # tokens per step
H, FF, LAYERS = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"]
KV = H * MODEL["num_key_value_heads"] // MODEL["num_attention_heads"]  # k, v width
HEAD_COLS = 1024  # training.losses._vocab_block(ROWS, vocab): 2 MB of logits per vocabulary block
HEAD_BLOCKS = MODEL["vocab_size"] // HEAD_COLS
NO_TRANS, TRANS, ROW_MAJOR = 111, 112, 101
# (n, k, B transposed, calls per step): C(ROWS x n) = A(ROWS x k) @ op(B)
SHAPES = [
    (H, H, True, 2 * LAYERS), (KV, H, True, 2 * LAYERS),  # q, o; k, v forward
    (FF, H, True, 2 * LAYERS), (H, FF, True, LAYERS),  # gate, up; down forward
    (H, H, False, 2 * LAYERS), (H, KV, False, 2 * LAYERS),  # their input gradients
    (H, FF, False, 2 * LAYERS), (FF, H, False, LAYERS),
    (HEAD_COLS, H, True, HEAD_BLOCKS), (H, HEAD_COLS, False, HEAD_BLOCKS),  # head: logits, hidden gradient
]


def load(path: str, threads: int) -> ctypes.CDLL:
    """``path`` with its ``cblas_sgemm`` typed and its threads set (OpenBLAS or MKL names)."""
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cblas_sgemm.argtypes = [i] * 6 + [ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    for setter in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        if hasattr(lib, setter):
            getattr(lib, setter)(threads)
    return lib


def operands(rng: np.random.Generator) -> list:
    """(A, B, C, n, k, transposed, calls) for every shape, fp32, C-contiguous."""
    out = []
    for n, k, transposed, calls in SHAPES:
        a = rng.standard_normal((ROWS, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if transposed else (k, n), dtype=np.float32)
        out.append((a, b, np.empty((ROWS, n), np.float32), n, k, transposed, calls))
    return out


def one_step(lib: ctypes.CDLL, ops: list) -> float:
    """Seconds for the step's matmuls: each shape timed once, times its calls per step."""
    total = 0.0
    for a, b, c, n, k, transposed, calls in ops:
        t0 = time.perf_counter()
        lib.cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS if transposed else NO_TRANS, ROWS, n, k, 1.0,
                        a.ctypes.data, k, b.ctypes.data, k if transposed else n, 0.0, c.ctypes.data, n)
        total += (time.perf_counter() - t0) * calls
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lib_a")
    ap.add_argument("lib_b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    libs = [load(args.lib_a, args.threads), load(args.lib_b, args.threads)]
    ops = operands(np.random.default_rng(0))
    flops = sum(2 * ROWS * n * k * calls for _, _, _, n, k, _, calls in ops)
    for _ in range(args.warmup):
        for lib in libs:
            one_step(lib, ops)
    times = np.array([[one_step(lib, ops) for lib in libs] for _ in range(args.rounds)])
    for name, col in zip((args.lib_a, args.lib_b), times.T):
        print(f"{name}: {flops / np.median(col) / 1e9:.1f} GFLOP/s (median of {args.rounds}; "
              f"{flops / 1e9:.0f} GFLOP of matmul per step)")
    ratio = times[:, 0] / times[:, 1]  # speed of B over A, per round
    lo, hi = np.percentile(ratio, [10, 90])
    print(f"B / A speed, {args.threads} thread(s): median {np.median(ratio):.3f}x, 10-90 %: {lo:.3f}-{hi:.3f}x")


if __name__ == "__main__":
    main()
