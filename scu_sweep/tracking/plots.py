"""The per-run PNG (``scu_run.png``) and the sweep's overlay (``sweep_comparison.png``),
drawn only from the run files. matplotlib is imported where a plot is drawn."""

from __future__ import annotations

from pathlib import Path

from ..records import atomic_replace, read_json
from .run_files import read_metrics, run_config


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
    import matplotlib  # lazy: heavy; imported only where a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_l, ax_v) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lambdas: list = []  # every run's λ, for the axis scale (the axis's lines include the verticals)
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
            lambdas += lam
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
    _log_if_wide(ax_l, lambdas, "λ")
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
    import matplotlib  # lazy: heavy; imported only where a plot is drawn

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
        ax_s.plot(x2, [100 * v for v in se], lw=1.5, label="Ŝ (the controller's, smoothed)")
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
