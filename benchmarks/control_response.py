"""How well the controller holds S: step-response figures from runs with saturation disabled.

    python benchmarks/control_response.py                       # every suite below (hours on 2 cores)
    python benchmarks/control_response.py --suite tiny --steps 300
    python benchmarks/control_response.py --from outputs/control_response/default   # tables only

Each suite is one multirun (``saturation.enabled=false``, so the run goes on past where it would
have stopped) into ``outputs/control_response/<suite>``; then, per run, from ``metrics.jsonl``:

- rise: first step with Ŝ within ±10 % of the target;
- overshoot: the largest excursion past the target after that, relative to it;
- settled: the step from which Ŝ stays within ±10 % to the end;
- raw S / Ŝ / val S band: min..max of (S − S*)/S* over the last third, S raw per step, Ŝ
  (what the controller holds), and S from ParamBPT and that evaluation's validation DataBPT;
- stop: where the default saturation rule (replayed on the same rows) would have stopped, and
  the raw S and Ŝ bands from there to 1.5× that step (what a run continued past its stop does),
  with the mean of the raw S there (the per-batch noise averaged out; a lagging D̄ shows as a bias);
- kept: the adapter saturation.keep=best_in_band keeps at that stop (the evaluation up to the
  stop with S from validation in band and the lowest validation DataBPT): its step, that S
  relative to the target, its ParamBPT and its validation DataBPT;
- plateau: the best validation DataBPT up to the stop, and the best from there to 1.5× the stop
  (a real plateau: the run continued gets no better).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scu_sweep.records import read_jsonl  # noqa: E402
from scu_sweep.scu.mdl import s_ratio  # noqa: E402
from scu_sweep.scu.saturation import SaturationConfig, SaturationDetector, keeps  # noqa: E402

SUITES = {
    "default": ["target_s=0.02,0.03,0.05"],
    "tiny": ["model=tiny", "target_s=0.02,0.03"],
    "lr": ["target_s=0.03", "train.lr=9e-5,9e-4"],  # the default lr 3e-4 × 0.3 and × 3, same gains
    "seed": ["controller=seed", "target_s=0.02,0.03,0.05"],
    "tiny_seed": ["model=tiny", "controller=seed", "target_s=0.02,0.03"],
}
BAND = 0.10  # ±10 %: rise and settling


def launch(suite: str, steps: int, out: Path) -> None:
    cmd = [sys.executable, "-m", "scu_sweep", "-m", *SUITES[suite], "saturation.enabled=false",
           f"train.steps={steps}", "logger=none", "train.resume=never", f"hydra.sweep.dir={out}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _rel(s: float, target: float) -> float:
    return s / target - 1


def _band(values) -> str:
    values = list(values)
    return f"{100 * min(values):+.1f}..{100 * max(values):+.1f} %" if values else "-"


def _band_mean(values) -> str:
    values = list(values)
    return f"{_band(values)} (mean {100 * sum(values) / len(values):+.1f} %)" if values else "-"


def _val_s(row: dict) -> float:
    return s_ratio(row["val_data_bpt"], row["param_bpt"])


def replay_stop(rows: list, target: float, cfg: SaturationConfig, lambda_min: float, lambda_max: float,
                steps_per_epoch: float):
    """The step where the saturation rule (with ``cfg``) would have stopped these rows, or None."""
    det = SaturationDetector(cfg, target, lambda_min, lambda_max, steps_per_epoch)
    for r in rows:
        if "val_data_bpt" in r:
            det.observe_val(r["step"], r["val_data_bpt"])
        if det.update(r["step"], r["lambda"], r["s_ema"]):
            return r["step"]
    return None


def replay_kept(evals: list, target: float, tol: float):
    """The evaluation row keep=best_in_band keeps among ``evals`` (in step order), or None."""
    kept = None
    for r in evals:
        if keeps(r["val_data_bpt"], r["param_bpt"], kept and kept["val_data_bpt"], target, tol):
            kept = r
    return kept


def _train_tokens(run_dir: Path) -> int:
    """N of the run: from summary.json, or (a run still going, or killed) the run's log line."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())["train_tokens"]
    return int(re.search(r"N=(\d+) train tokens", (run_dir / "__main__.log").read_text()).group(1))


def analyse(run_dir: Path, cfg: SaturationConfig) -> dict:
    import yaml

    conf = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    target, rows = float(conf["target_s"]), read_jsonl(run_dir / "metrics.jsonl")
    steps_per_epoch = _train_tokens(run_dir) / (conf["train"]["seq_len"] * conf["train"]["batch_size"])
    err = [_rel(r["s_ema"], target) for r in rows]
    inside = [abs(e) < BAND for e in err]
    rise = next((i for i, ok in enumerate(inside) if ok), None)
    settled = next((i for i in range(len(rows)) if all(inside[i:])), None)
    above = err[0] > 0  # approached from above: overshoot is the dip below
    after = err[rise:] if rise is not None else []
    overshoot = max((-e if above else e) for e in after) if after else None
    last = rows[2 * len(rows) // 3:]
    stop = replay_stop(rows, target, cfg, conf["controller"]["lambda_min"], conf["controller"]["lambda_max"],
                       steps_per_epoch)
    tail = [r for r in rows if stop is not None and stop < r["step"] <= 1.5 * stop]
    at_stop = [r for r in rows if stop is not None and r["step"] <= stop and "val_data_bpt" in r]
    kept = replay_kept(at_stop, target, cfg.s_tolerance)
    val_after = [r["val_data_bpt"] for r in tail if "val_data_bpt" in r]
    return {
        "run": run_dir.name, "target": target, "lr": conf["train"]["lr"], "law": conf["controller"]["law"],
        "model": conf["model"]["name"], "steps": len(rows),
        "rise": rows[rise]["step"] if rise is not None else None,
        "overshoot": f"{100 * max(overshoot, 0):.1f} %" if overshoot is not None else "-",
        "settled": rows[settled]["step"] if settled is not None else None,
        "raw": _band(_rel(r["s_ratio"], target) for r in last),
        "hat": _band(_rel(r["s_ema"], target) for r in last),
        "val": _band(_rel(_val_s(r), target) for r in last if "val_data_bpt" in r),
        "lambda_end": rows[-1]["lambda"],
        "stop": stop,
        "s_val_at_stop": f"{100 * _rel(_val_s(at_stop[-1]), target):+.1f} %" if at_stop else "-",
        "after_raw": _band_mean(_rel(r["s_ratio"], target) for r in tail),
        "after_hat": _band(_rel(r["s_ema"], target) for r in tail),
        "kept": (f"{kept['step']} | {100 * _rel(_val_s(kept), target):+.1f} % | {kept['param_bpt']:.4f} | "
                 f"{kept['val_data_bpt']:.3f}") if kept else "- | - | - | -",
        "plateau": (f"{min(r['val_data_bpt'] for r in at_stop):.3f} | "
                    f"{min(val_after):.3f} (to {tail[-1]['step']})") if at_stop and val_after else "- | -",
        "val_bpt_end": next((r["val_data_bpt"] for r in reversed(rows) if "val_data_bpt" in r), None),
    }


def table(sweep: Path, cfg: SaturationConfig) -> str:
    runs = [sweep] if (sweep / "metrics.jsonl").is_file() else sorted(
        (d for d in sweep.iterdir() if (d / "metrics.jsonl").is_file()), key=lambda d: d.name)
    head = ("| model | law | lr | S* | rise | overshoot | settled | raw S, last third | Ŝ, last third | val S, last third | "
            "λ end | stop (replayed) | val S at stop | raw S after stop | Ŝ after stop | kept step | val S kept | "
            "ParamBPT kept | val DataBPT kept | best val to stop | best val after stop |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in runs:
        a = analyse(d, cfg)
        lines.append(f"| {a['model']} | {a['law']} | {a['lr']:g} | {100 * a['target']:g} % | {a['rise']} | "
                     f"{a['overshoot']} | {a['settled']} | {a['raw']} | {a['hat']} | {a['val']} | {a['lambda_end']:.3g} | "
                     f"{a['stop']} | {a['s_val_at_stop']} | {a['after_raw']} | {a['after_hat']} | {a['kept']} | "
                     f"{a['plateau']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--from", dest="existing", type=Path, nargs="*", help="analyse these sweep or run dirs only")
    args = p.parse_args()
    cfg = SaturationConfig()  # the default stop rule, replayed
    if args.existing:
        sweeps = args.existing
    else:
        sweeps = []
        for suite in (SUITES if args.suite == "all" else [args.suite]):
            out = ROOT / "outputs" / "control_response" / suite
            launch(suite, args.steps, out)
            sweeps.append(out)
    for sweep in sweeps:
        print(f"\n{sweep}\n{table(sweep, cfg)}")


if __name__ == "__main__":
    main()
