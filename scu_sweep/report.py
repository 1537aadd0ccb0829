"""Sweep comparison (CSV, Markdown, PNG) and the per-run PNG, read only from run files.

`python -m scu_sweep.report SWEEP_DIR` writes `sweep_summary.csv`, `sweep_report.md`
and `sweep_comparison.png` into a Hydra multirun directory.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .records import atomic_replace, atomic_write_text, read_json
from .redact import redact_text

FINAL_KEYS = ("loss", "data_bpt", "param_bpt", "s_ratio", "lambda", "val_data_bpt")
COLUMNS = (
    ["job", "state", "overrides", "target_s", "kp", "ki", "prior_sigma", "stop_reason",
     "prune_reason", "saturation_step", "adapter_step", "steps_run"]
    + [f"final_{k}" for k in FINAL_KEYS]
    + ["best_val_data_bpt", "tokens_seen", "wall_s", "tokens_per_s", "error"]
)
TRIAL_COLUMNS = ["trial_number", "trial_state", "trial_value"]


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of `metrics.jsonl`; a torn last line (a killed run) is skipped."""
    rows = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_yaml(path: Path) -> Any:
    """Parsed YAML (Hydra's `.hydra/*.yaml`), or None."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def run_config(run_dir: Path) -> dict:
    """The job's composed config from `.hydra/config.yaml` ({} if absent)."""
    return read_yaml(Path(run_dir) / ".hydra" / "config.yaml") or {}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Numeric job subdirectories of a multirun dir, in numeric order."""
    subs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(subs, key=lambda p: int(p.name))


def job_row(job_dir: Path) -> dict:
    """One CSV row for a job: summary.json, else failure.json, else state `missing`."""
    summary = read_json(job_dir / "summary.json")
    failure = None if summary else read_json(job_dir / "failure.json")
    src = summary or failure or {}
    cfg = run_config(job_dir)
    overrides = read_yaml(job_dir / ".hydra" / "overrides.yaml")
    if overrides is None:
        overrides = src.get("overrides") or []
    ctl, prior = cfg.get("controller") or {}, cfg.get("prior") or {}
    row: dict[str, Any] = {
        "job": int(job_dir.name),
        "state": "ok" if summary else ("failed" if failure else "missing"),
        "overrides": " ".join(redact_text(str(o)) for o in overrides),
        "target_s": src.get("target_s", cfg.get("target_s")),
        "kp": src.get("kp", ctl.get("kp")),
        "ki": src.get("ki", ctl.get("ki")),
        "prior_sigma": src.get("prior_sigma", prior.get("sigma")),
    }
    for k in ("stop_reason", "prune_reason", "saturation_step", "adapter_step", "steps_run"):
        row[k] = src.get(k)
    final, best = src.get("final") or {}, src.get("best") or {}
    for k in FINAL_KEYS:
        row[f"final_{k}"] = final.get(k)
    row["best_val_data_bpt"] = best.get("val_data_bpt")
    for k in ("tokens_seen", "wall_s", "tokens_per_s", "error"):
        row[k] = src.get(k)
    trial = read_json(job_dir / "trial.json")
    if trial is not None:
        row.update(trial_number=trial.get("number"), trial_state=trial.get("state"),
                   trial_value=trial.get("value"))
    return row


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return str(v)


def _fmt(v: Any) -> str:
    """Markdown cell: floats to 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")


def write_markdown(rows: list[dict], path: Path, title: str) -> Path:
    """A Markdown table of the sweep, one line per job."""
    cols = [("job", "job"), ("overrides", "overrides"), ("state", "state"),
            ("stop_reason", "stop"), ("saturation_step", "sat. step"),
            ("steps_run", "steps"), ("target_s", "S*"), ("final_s_ratio", "S"),
            ("final_lambda", "λ"), ("final_data_bpt", "DataBPT"),
            ("final_val_data_bpt", "val DataBPT"), ("best_val_data_bpt", "best val"),
            ("tokens_per_s", "tok/s")]
    if any("trial_number" in r for r in rows):
        cols[1:1] = [("trial_number", "trial"), ("trial_state", "trial state")]
    lines = [f"# Sweep {title}", "",
             "| " + " | ".join(h for _, h in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    lines += ["", ("BPT = bits per token; S = ParamBPT / (DataBPT + ParamBPT); "
                   "val = validation; sat. step = MDL saturation step (empty: not reached)."), ""]
    atomic_write_text(path, "\n".join(lines))
    return path


def write_sweep_report(sweep_dir: Path) -> Path:
    """Write sweep_summary.csv, sweep_report.md and sweep_comparison.png; return the CSV path."""
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    rows = [job_row(j) for j in jobs]
    cols = COLUMNS + (TRIAL_COLUMNS if any("trial_number" in r for r in rows) else [])
    out = sweep_dir / "sweep_summary.csv"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: _cell(r.get(c)) for c in cols})
    atomic_write_text(out, buf.getvalue())
    write_markdown(rows, sweep_dir / "sweep_report.md", sweep_dir.name)
    plot_sweep(sweep_dir, jobs, rows)
    return out


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows
           if r.get(key) is not None and r.get("step") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _log_if_wide(ax, values: list, label: str) -> None:
    """Log y axis when positive values span more than a decade."""
    vals = [v for v in values if v is not None and v > 0]
    wide = bool(vals) and len(vals) == len([v for v in values if v is not None]) and \
        max(vals) > 10 * min(vals)
    if wide:
        ax.set_yscale("log")
    ax.set_ylabel(label + (" (log scale)" if wide else ""))


def short_labels(rows: list[dict]) -> list[str]:
    """`job: overrides` keeping only the overrides that differ between jobs."""
    lists = [r["overrides"].split() for r in rows]
    common = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    return [f"{r['job']}: " + (" ".join(o for o in ov if o not in common) or "(defaults)")
            for r, ov in zip(rows, lists)]


def plot_sweep(sweep_dir: Path, jobs: list[Path], rows: list[dict]) -> Path:
    """Overlay the runs: S(t) vs each run's target, λ(t), validation DataBPT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_l, ax_v) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (job, row, label) in enumerate(zip(jobs, rows, short_labels(rows))):
        metrics = read_metrics(job)
        c = colors[i % len(colors)]
        label = label if len(label) <= 60 else label[:57] + "..."
        x, s = _series(metrics, "s_ratio")
        if x:
            ax_s.plot(x, [100 * v for v in s], color=c, lw=1.2, label=label)
        if row.get("target_s") is not None:
            ax_s.axhline(100 * row["target_s"], color=c, ls="--", lw=0.9)
        x, lam = _series(metrics, "lambda")
        if x:
            ax_l.plot(x, lam, color=c, lw=1.2, label=label)
        x, v = _series(metrics, "val_data_bpt")
        if x:
            ax_v.plot(x, v, color=c, marker="o", ms=3, lw=1.2, label=label)
        sat = row.get("saturation_step")
        if sat is not None:
            for ax in (ax_s, ax_l, ax_v):
                ax.axvline(sat, color=c, ls=":", lw=0.9)
    ax_s.set(title="S(t) per run (dashed: its target)", xlabel="step", ylabel="S (%)")
    _log_if_wide(ax_s, [r.get("target_s") for r in rows], "S (%)")  # targets span decades?
    ax_l.set(title="λ(t)", xlabel="step")
    _log_if_wide(ax_l, [float(v) for line in ax_l.lines for v in line.get_ydata()], "λ")
    ax_v.set(title="validation DataBPT", xlabel="step", ylabel="bits per token")
    for ax in (ax_s, ax_l, ax_v):
        ax.grid(alpha=0.3)
    handles, labels = max((ax.get_legend_handles_labels() for ax in (ax_s, ax_l, ax_v)),
                          key=lambda hl: len(hl[1]))
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)),
                   fontsize=8, frameon=False)
    fig.suptitle(f"Sweep {sweep_dir.name} — dotted verticals: saturation step")
    fig.tight_layout(rect=(0, 0.1 if labels else 0, 1, 1))
    out = sweep_dir / "sweep_comparison.png"
    atomic_replace(out, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return out


def plot_run(run_dir: Path, summary: dict | None = None) -> Path:
    """Write run_dir/scu_run.png: S vs target band, λ, DataBPT, ParamBPT; saturation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    summary = summary or read_json(run_dir / "summary.json") or read_json(
        run_dir / "failure.json") or {}
    cfg = run_config(run_dir)
    target = summary.get("target_s", cfg.get("target_s"))
    tol = (cfg.get("saturation") or {}).get("s_tolerance", 0.1)
    metrics = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    (ax_s, ax_l), (ax_d, ax_p) = axes
    x, s = _series(metrics, "s_ratio")
    ax_s.plot(x, [100 * v for v in s], lw=1, alpha=0.6, label="S")
    x2, se = _series(metrics, "s_ema")
    if x2:
        ax_s.plot(x2, [100 * v for v in se], lw=1.5, label="Ŝ (EMA)")
    if target is not None:
        ax_s.axhline(100 * target, color="k", ls="--", lw=1, label=f"target {100 * target:.3g} %")
        ax_s.axhspan(100 * target * (1 - tol), 100 * target * (1 + tol), color="green",
                     alpha=0.15, label=f"tolerance band (±{100 * tol:.3g} % of target)")
    ax_s.set(title="information ratio S", ylabel="S (%)")
    x, lam = _series(metrics, "lambda")
    ax_l.plot(x, lam, color="tab:red", lw=1.5, label="λ")
    ax_l.set(title="regularisation strength λ")
    _log_if_wide(ax_l, lam, "λ")
    x, d = _series(metrics, "data_bpt")
    ax_d.plot(x, d, lw=1, label="train DataBPT")
    x, v = _series(metrics, "val_data_bpt")
    if x:
        ax_d.plot(x, v, marker="o", ms=3, lw=1.5, label="val DataBPT")
    ax_d.set(title="DataBPT", xlabel="step", ylabel="bits per token")
    x, p = _series(metrics, "param_bpt")
    ax_p.plot(x, p, color="tab:purple", lw=1.5, label="ParamBPT")
    ax_p.set(title="ParamBPT", xlabel="step", ylabel="bits per token")
    sat = summary.get("saturation_step")
    for ax in axes.flat:
        if sat is not None:
            ax.axvline(sat, color="tab:green", ls=":", lw=1.5, label=f"saturation (step {sat})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    stop = summary.get("stop_reason", "")
    fig.suptitle(f"SCU run {run_dir.name}" + (f" — stop: {stop}" if stop else ""))
    fig.tight_layout()
    out = run_dir / "scu_run.png"
    atomic_replace(out, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scu_sweep.report",
                                 description="Write the comparison of a Hydra multirun dir.")
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        ap.error(f"sweep_dir={args.sweep_dir}: not a directory")
    out = write_sweep_report(args.sweep_dir)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
