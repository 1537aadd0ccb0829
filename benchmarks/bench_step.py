"""Tokens/s of one SCU LoRA training step: MLX stock BLAS, MLX + OpenBLAS, PyTorch + PEFT.

Shape: SmolLM2-135M (random init), batch 4 x seq 128, LoRA r16 on q/k/v/o/gate/up/down,
AdamW, fp32. Each backend runs in its own subprocess, because the BLAS preload must
precede ``import mlx.core`` and must never share a process with torch:

    python benchmarks/bench_step.py [--torch-python /tmp/benchvenv/bin/python]

``build_mlx_step`` is the one function to swap for the project's real step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scu_sweep import backend  # noqa: E402  (stdlib only; imports no MLX)

MODEL = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
ROWS = [  # (worker, table label, step variant)
    ("stock", "MLX stock BLAS", "scu"),
    ("openblas", "MLX + OpenBLAS", "scu"),
    ("openblas", "MLX + OpenBLAS", "plain"),
    ("torch", "PyTorch + PEFT", "scu"),
    ("parallel", "MLX + OpenBLAS, one-thread processes side by side (sum)", "scu"),
]
SIGMA, TRAIN_TOKENS = 0.1, 1e6  # prior sigma and N of the penalty; any values time the same


def build_mlx_step(penalty: bool, batch: int, seq: int, rank: int = 16) -> Callable[[], object]:
    """A zero-argument callable that runs one full training step and returns the loss.

    ``penalty`` adds the SCU term lam * sum(w^2) / (2 sigma^2 N), lam an mx.array
    input of the compiled step. Model, optimizer and RNG state are the compiled
    step's inputs and outputs.
    """
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = Model(ModelArgs(**MODEL))
    model.freeze()
    lora = {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": KEYS}
    linear_to_lora_layers(model, MODEL["num_hidden_layers"], lora)
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    scale = 1.0 / (2 * SIGMA**2 * TRAIN_TOKENS)

    def loss_fn(model, x, y, lam):
        ce = nn.losses.cross_entropy(model(x), y, reduction="mean")
        if not penalty:
            return ce
        sq = sum(mx.sum(p * p) for _, p in tree_flatten(model.trainable_parameters()))
        return ce + lam * scale * sq

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, lam):
        loss, grads = loss_and_grad(model, x, y, lam)
        opt.update(model, grads)
        return loss

    tokens = mx.random.randint(0, MODEL["vocab_size"], (batch, seq + 1))
    x, y, lam = tokens[:, :-1], tokens[:, 1:], mx.array(1.0)

    def run():
        loss = step(x, y, lam)
        mx.eval(loss, state)
        return loss

    return run


def time_steps(run: Callable[[], object], warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """Median fp32 GFLOP/s of an n^3 matmul on MLX's CPU device."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    times = time_steps(lambda: mx.eval(a @ b), 1, reps)
    return 2 * n**3 / statistics.median(times) / 1e9


def mlx_worker(args: argparse.Namespace) -> dict:
    """Runs in a child: preload (unless SCU_SWEEP_BLAS=off), then MLX and the steps."""
    desc = backend.preload_blas()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    out = {"blas": desc or "stock", "mlx": mx.__version__, "gflops": matmul_gflops()}
    for variant in args.variants.split(","):
        run = build_mlx_step(variant == "scu", args.batch, args.seq)
        out[variant] = time_steps(run, args.warmup, args.steps)
    return out


def child(cmd: list[str], env: dict[str, str]) -> dict:
    """Run a worker command; its last stdout line is JSON, or an error is returned."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parallel_children(cmd: list[str], env: dict[str, str], k: int) -> dict:
    """k one-thread workers at once (a parallel multirun's shape); their tokens/s add up.

    Reported as one 'process' whose step time is tokens / (sum of tokens/s)."""
    env = dict(env)
    backend.set_blas_threads(1, env)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(k)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    per_step = [statistics.median(o["scu"]) for o in outs]
    combined = 1.0 / sum(1.0 / t for t in per_step)  # seconds per step of all k together
    return {"blas": f"{k} x {outs[0]['blas']}", "scu": [combined], "per_process_s": per_step}


def default_torch_python() -> str:
    venv = Path("/tmp/benchvenv/bin/python")
    fallback = str(venv) if venv.exists() else sys.executable
    return os.environ.get("SCU_BENCH_TORCH_PYTHON") or fallback


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2, help="BLAS / torch threads per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--stock-steps", type=int, default=2, help="timed steps, stock BLAS")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--torch-python", default=default_torch_python())
    ap.add_argument("--skip", default="", help="comma list of: stock, openblas, torch, parallel")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes for the parallel row")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="scu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(mlx_worker(args)))
        return

    env = {k: v for k, v in os.environ.items() if k not in {"LD_PRELOAD", backend.ENV_VAR}}
    backend.set_blas_threads(args.threads, env)
    shape = ["--batch", str(args.batch), "--seq", str(args.seq)]
    timing = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", *shape]
    skip = set(filter(None, args.skip.split(",")))
    res = {}  # the slow stock run goes last so the other two run close together
    load0 = os.getloadavg()[0]
    if "openblas" not in skip:
        cmd = me + ["--variants", "scu,plain", *timing]
        res["openblas"] = child(cmd, env)
    if "torch" not in skip:
        script = str(ROOT / "benchmarks" / "torch_peft_step.py")
        cmd = [args.torch_python, script, *shape, "--threads", str(args.threads), *timing]
        res["torch"] = child(cmd, env)
    if "parallel" not in skip:
        res["parallel"] = parallel_children(me + ["--variants", "scu", *timing], env, args.jobs)
    if "stock" not in skip:
        cmd = me + ["--variants", "scu", "--warmup", "1", "--steps", str(args.stock_steps)]
        res["stock"] = child(cmd, {**env, backend.ENV_VAR: "off"})
    report(res, args, load0)


def report(res: dict, args: argparse.Namespace, load0: float) -> None:
    """Print the table and the ratios."""
    tokens = args.batch * args.seq
    rows, tps = [], {}
    for key, name, variant in ROWS:
        r = res.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {name} | {variant} | - | - | - | {r['error']} |")
            continue
        times = r["times"] if key == "torch" else r[variant]
        med = statistics.median(times)
        tps[key, variant] = tokens / med
        if key == "torch":
            note = f"torch {r['torch']}, {r['threads']} threads"
        else:
            note = r["blas"].split(" from ")[0]
        spread = f"{min(times):.2f}-{max(times):.2f}"
        rows.append(f"| {name} | {variant} | {med:.3f} | {spread} | {tokens / med:.1f} | {note} |")

    print(f"\nSCU LoRA step, SmolLM2-135M shape, B{args.batch} x L{args.seq}, r16 x 7 projections, "
          f"AdamW fp32, {args.threads} threads; median of timed steps, warm-up excluded")
    for key in ("stock", "openblas"):
        if "gflops" in res.get(key, {}):
            print(f"2048^3 fp32 matmul, {res[key]['blas']}: {res[key]['gflops']:.1f} GFLOP/s")
    print("\n| backend | step | median s | min-max s | tokens/s | notes |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    ratios = [("MLX+OpenBLAS / PyTorch", ("openblas", "scu"), ("torch", "scu")),
              ("OpenBLAS / stock", ("openblas", "scu"), ("stock", "scu")),
              ("plain / SCU step (SCU overhead)", ("openblas", "plain"), ("openblas", "scu")),
              ("parallel processes together / PyTorch", ("parallel", "scu"), ("torch", "scu"))]
    print()
    for label, a, b in ratios:
        if a in tps and b in tps:
            print(f"{label}: {tps[a] / tps[b]:.3f}x")
    print(f"load average before / after: {load0:.2f} / {os.getloadavg()[0]:.2f} "
          f"(other work on the machine skews these numbers)")


if __name__ == "__main__":
    main()
