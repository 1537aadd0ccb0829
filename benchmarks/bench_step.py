"""Tokens/s of one SCU LoRA training step: MLX stock BLAS, MLX + OpenBLAS, PyTorch + PEFT.

Shape: SmolLM2-135M (random init), batch 4 x seq 128, LoRA r16 on q/k/v/o/gate/up/down,
AdamW, fp32. The MLX step is the project's own: ``scu_sweep.models.lora.apply_lora``,
``scu_sweep.training.loop.make_optimizer`` and ``make_train_step`` (CE + λ·coef·Σw², λ an
input of the compiled step). Each backend runs in its own subprocess, because the BLAS
preload must precede ``import mlx.core`` and must never share a process with torch:

    python benchmarks/bench_step.py [--torch-python /tmp/benchvenv/bin/python]

Rows: one MLX process (SCU step, and a plain LoRA step without penalty or metrics),
PyTorch + PEFT, k one-thread MLX processes side by side (a parallel multirun), and one
run as ``train.ranks=2`` (two ``mx.distributed`` ranks on loopback, ring backend, one
BLAS thread each, each on half of the global batch, gradients averaged), started by
``scu_sweep.ranks.run_local_ranks`` as a ``train.ranks`` run is.
``--code mlx-lm,project`` (default) times, interleaved in one process, the step with
mlx-lm's own model functions and ``nn.losses.cross_entropy`` (the reference) and the
project's step as it runs (``train.ce_loss``: output head and CE fused, and
``models.fast_ops.install_fast_ops``, as ``models.load.load`` does on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scu_sweep.training import backend  # noqa: E402  (stdlib only; imports no MLX)

MODEL = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
LORA = dict(
    rank=16, alpha=32, dropout=0.0, num_layers=-1,
    keys=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
)
ROWS = [  # (worker, table label, step variant)
    ("stock", "MLX stock BLAS", "scu"),
    ("openblas", "MLX + OpenBLAS", "scu"),
    ("openblas", "MLX + OpenBLAS", "plain"),
    ("torch", "PyTorch + PEFT", "scu"),
    ("parallel", "MLX + OpenBLAS, one-thread processes side by side (sum)", "scu"),
    ("parallel_batch", "the same, each process SCHED_BATCH as the sweep's workers are (sum)", "scu"),
    ("ranks", "MLX + OpenBLAS, one run with train.ranks=2 (global batch)", "scu"),
]
CODES = ("mlx-lm", "project")
SIGMA, TRAIN_TOKENS = 0.1, 1_000_000  # prior sigma and N of the penalty; any values time the same
VAL_BLOCKS, VAL_BATCHES = 11, 4  # the main job's validation pass: 1,408 tokens = 11 blocks; train.val_batches


def reference_ce(model, x, y):
    """mlx-lm's logits and MLX's own cross-entropy (what the project's fused loss replaces)."""
    import mlx.core as mx
    import mlx.nn as nn

    return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")


def build_mlx_step(variant: str, code: str, batch: int, seq: int, group=None) -> Callable[[], object]:
    """A zero-argument callable that runs one training step and waits for it.

    ``scu``: ``scu_sweep.training.loop.make_train_step`` (CE + λ·coef·Σw², also returns CE and
    Σw²). ``plain``: the same LoRA step with no penalty and no Σw² at all. ``eval``: one
    validation pass as the loop runs it (``loop.evaluate`` over ``VAL_BLOCKS`` blocks in
    batches of ``batch``). With a distributed ``group`` this rank takes rows ``rank::size``
    of the global batch. The step is traced here (two calls), under the chosen code.
    """
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.models.llama import Model, ModelArgs
    from omegaconf import OmegaConf

    import scu_sweep.training.loop as train
    from scu_sweep.models import fast_ops
    from scu_sweep.scu import mdl
    from scu_sweep.models.lora import apply_lora
    from scu_sweep.training.data import Corpus

    mx.random.seed(0)
    model = Model(ModelArgs(**MODEL))
    apply_lora(model, OmegaConf.create(LORA))
    opt = train.make_optimizer(OmegaConf.create({"lr": 1e-4, "warmup_steps": 0}))
    opt.init(model.trainable_parameters())  # one trace, not two (the state's structure is fixed)
    tokens = mx.random.randint(0, MODEL["vocab_size"], (batch, seq + 1))
    if group is not None:
        tokens = tokens[group.rank()::group.size()]
    x, y, lam = tokens[:, :-1], tokens[:, 1:], mx.array(1.0)
    ce_loss = train.ce_loss if code == "project" else reference_ce
    saved, installed = train.ce_loss, []
    try:  # patches hold while the step is traced, by its first two calls, and no longer
        if code == "project":
            installed = fast_ops.install_fast_ops(model)
        if variant == "eval":
            val = np.random.default_rng(0).integers(0, MODEL["vocab_size"], (VAL_BLOCKS, seq + 1), dtype=np.int32)
            corpus = Corpus(train=val[:0], val=val)
            eval_ce = mx.compile(partial(ce_loss, model), inputs=model.state)

            def step(x, y, lam):
                return mx.array(train.evaluate(model, eval_ce, corpus, batch, VAL_BATCHES))
        elif variant == "scu":
            train.ce_loss = ce_loss  # make_train_step looks ce_loss up when it traces
            step = train.make_train_step(model, opt, mdl.penalty_coef(SIGMA, TRAIN_TOKENS), group)
        else:
            loss_and_grad = nn.value_and_grad(model, ce_loss)
            state = [model.state, opt.state, mx.random.state]

            @partial(mx.compile, inputs=state, outputs=state)
            def step(x, y, lam):
                ce, grads = loss_and_grad(model, x, y)
                if group is not None:
                    grads = nn.average_gradients(grads, group=group)
                opt.update(model, grads)
                return ce

        def run():
            out = step(x, y, lam)
            mx.eval(out, model.state, opt.state)
            return out

        run(), run()
    finally:
        train.ce_loss = saved
        for module, name, original in installed:
            setattr(module, name, original)
    return run


def time_interleaved(runs: dict[str, Callable[[], object]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each run, calls interleaved round-robin after ``warmup`` rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {k: [] for k in runs}
    for _ in range(steps):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return times


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """Median fp32 GFLOP/s of an n^3 matmul on MLX's CPU device."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    times = time_interleaved({"mm": lambda: mx.eval(a @ b)}, 1, reps)["mm"]
    return 2 * n**3 / statistics.median(times) / 1e9


def mlx_worker(args: argparse.Namespace) -> dict:
    """Runs in a child: preload (unless SCU_SWEEP_BLAS=off), then MLX and the steps."""
    desc = backend.preload_blas()
    if args.sched_batch:
        backend.batch_scheduling()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    out = {"blas": desc or "stock", "mlx": mx.__version__, "gflops": matmul_gflops()}
    runs = {f"{v}/{code}": build_mlx_step(v, code, args.batch, args.seq)
            for code in args.code.split(",") for v in args.variants.split(",")
            if v != "eval" or code == "project"}  # the loop evaluates with the project's code only
    out.update(time_interleaved(runs, args.warmup, args.steps))
    return out


def ranks_worker(args: argparse.Namespace) -> None:
    """One rank of the ``train.ranks`` row; rank 0 writes the JSON."""
    desc = backend.preload_blas()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    group = mx.distributed.init(strict=True)
    code = args.code.split(",")[-1]
    run = build_mlx_step("scu", code, args.batch, args.seq, group=group)
    times = time_interleaved({"scu": run}, args.warmup, args.steps)["scu"]
    if group.rank() == 0:
        result = {"blas": f"{group.size()} ranks x {desc or 'stock'}", f"scu/{code}": times}
        Path(args.out).write_text(json.dumps(result))


def child(cmd: list[str], env: dict[str, str]) -> dict:
    """Run a worker command; its last stdout line is JSON, or an error is returned."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parallel_children(cmd: list[str], env: dict[str, str], k: int, key: str) -> dict:
    """k one-thread workers at once (a parallel multirun's shape); their tokens/s add up.

    Reported as one 'process' whose step time is tokens / (sum of tokens/s)."""
    env = dict(env)
    backend.set_blas_threads(1, env)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(k)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            return {"error": f"exit {p.returncode}: {(stderr.strip().splitlines() or ['no output'])[-1]}"}
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    per_step = [statistics.median(o[key]) for o in outs]
    combined = 1.0 / sum(1.0 / t for t in per_step)  # seconds per step of all k together
    return {"blas": f"{k} x {outs[0]['blas']}", key: [combined], "per_process_s": per_step}


def ranks_run(me: list[str], env: dict[str, str], n: int, timing: list[str]) -> dict:
    """One run as ``n`` ranks, started as ``scu_sweep.ranks.launch`` starts them."""
    from scu_sweep.ranks import run_local_ranks

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        code = run_local_ranks([*me, "--rank-worker", "--out", str(out), *timing], n, Path(tmp), env)
        if code != 0 or not out.exists():
            return {"error": f"exit {code}" + ("" if out.exists() else ", rank 0 wrote no result")}
        return json.loads(out.read_text())


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
    ap.add_argument("--code", default="mlx-lm,project",
                    help="comma list of: mlx-lm (mlx-lm's model functions, MLX's cross-entropy), "
                         "project (the step as scu_sweep runs it); the one-process rows time "
                         "each, the other rows the last")
    ap.add_argument("--torch-python", default=default_torch_python())
    ap.add_argument("--skip", default="", help="comma list of: stock, openblas, torch, parallel, parallel_batch, ranks")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes for the parallel row")
    ap.add_argument("--ranks", type=int, default=2, help="ranks for the train.ranks row")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sched-batch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="scu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if bad := set(args.code.split(",")) - set(CODES):
        ap.error(f"--code: unknown {sorted(bad)}; allowed: {', '.join(CODES)}")
    if args.worker:
        print(json.dumps(mlx_worker(args)))
        return
    if args.rank_worker:
        ranks_worker(args)
        return

    env = {k: v for k, v in os.environ.items() if k not in {"LD_PRELOAD", backend.ENV_VAR}}
    backend.set_blas_threads(args.threads, env)
    shape = ["--batch", str(args.batch), "--seq", str(args.seq)]
    timing = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    last = args.code.split(",")[-1]
    me = [sys.executable, str(Path(__file__).resolve()), *shape]
    skip = set(filter(None, args.skip.split(",")))
    res = {}  # the slow stock run goes last so the others run close together
    load0 = os.getloadavg()[0]
    if "openblas" not in skip:
        res["openblas"] = child(me + ["--worker", "--variants", "scu,plain,eval", "--code", args.code, *timing], env)
    if "torch" not in skip:
        script = str(ROOT / "benchmarks" / "torch_peft_step.py")
        cmd = [args.torch_python, script, *shape, "--threads", str(args.threads), *timing]
        res["torch"] = child(cmd, env)
    if "parallel" not in skip:
        cmd = me + ["--worker", "--variants", "scu", "--code", last, *timing]
        res["parallel"] = parallel_children(cmd, env, args.jobs, f"scu/{last}")
    if "parallel_batch" not in skip:
        cmd = me + ["--worker", "--sched-batch", "--variants", "scu", "--code", last, *timing]
        res["parallel_batch"] = parallel_children(cmd, env, args.jobs, f"scu/{last}")
    if "ranks" not in skip:
        res["ranks"] = ranks_run(me, env, args.ranks, ["--code", last, *timing])
    if "stock" not in skip:
        cmd = me + ["--worker", "--variants", "scu", "--code", last, "--warmup", "1", "--steps", str(args.stock_steps)]
        res["stock"] = child(cmd, {**env, backend.ENV_VAR: "off"})
    report(res, args, load0)


def report(res: dict, args: argparse.Namespace, load0: float) -> None:
    """Print the table and the ratios."""
    tokens = args.batch * args.seq
    codes = args.code.split(",")
    rows, tps = [], {}
    for key, name, variant in ROWS:
        r = res.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {name} | {variant} | - | - | - | - | {r['error']} |")
            continue
        for code in (["torch"] if key == "torch" else codes if key == "openblas" else [codes[-1]]):
            times = r["times"] if key == "torch" else r.get(f"{variant}/{code}")
            if not times:
                continue
            med = statistics.median(times)
            tps[key, variant, code] = tokens / med
            if key == "torch":
                note = f"torch {r['torch']}, {r['threads']} threads"
            else:
                note = r["blas"].split(" from ")[0]
            spread = f"{min(times):.3f}-{max(times):.3f}"
            rows.append(f"| {name} | {variant} | {code} | {med:.3f} | {spread} | {tokens / med:.1f} | {note} |")

    print(f"\nSCU LoRA step, SmolLM2-135M shape, B{args.batch} x L{args.seq}, r16 x 7 projections, "
          f"AdamW fp32, {args.threads} threads per process unless noted; median of {args.steps} timed "
          f"steps after {args.warmup} warm-up steps; code: mlx-lm = mlx-lm's model functions and MLX's "
          "cross-entropy, project = the step as scu_sweep runs it (fused head + CE, fast_ops.install_fast_ops)")
    for key in ("stock", "openblas"):
        if "gflops" in res.get(key, {}):
            print(f"2048^3 fp32 matmul, {res[key]['blas']}: {res[key]['gflops']:.1f} GFLOP/s")
    print("\n| backend | step | code | median s | min-max s | tokens/s | notes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    torch = ("torch", "scu", "torch")
    ratios = []
    for code in codes:
        ratios += [(f"MLX+OpenBLAS / PyTorch ({code})", ("openblas", "scu", code), torch),
                   (f"plain / SCU step, SCU overhead ({code})", ("openblas", "plain", code), ("openblas", "scu", code))]
    for code in codes[1:]:
        ratios.append((f"SCU step, {code} / {codes[0]}", ("openblas", "scu", code), ("openblas", "scu", codes[0])))
    last = codes[-1]
    ratios += [("OpenBLAS / stock", ("openblas", "scu", last), ("stock", "scu", last)),
               (f"parallel processes together / PyTorch ({last})", ("parallel", "scu", last), torch),
               ("parallel processes, SCHED_BATCH / default scheduling", ("parallel_batch", "scu", last),
                ("parallel", "scu", last)),
               (f"train.ranks={args.ranks} / PyTorch ({last})", ("ranks", "scu", last), torch)]
    print()
    for label, a, b in ratios:
        if a in tps and b in tps:
            print(f"{label}: {tps[a] / tps[b]:.3f}x")
    ob = res.get("openblas", {})
    if ob.get("eval/project") and ob.get("scu/project"):
        ev, st = statistics.median(ob["eval/project"]), statistics.median(ob["scu/project"])
        print(f"one validation pass ({VAL_BLOCKS} blocks forward, batches of {args.batch}) / one SCU step "
              f"(project): {ev:.3f} / {st:.3f} s = {ev / st:.2f} steps")
    print(f"load average before / after: {load0:.2f} / {os.getloadavg()[0]:.2f} "
          f"(other work on the machine skews these numbers)")


if __name__ == "__main__":
    main()
