"""Sweep comparison (CSV, Markdown, PNG), read only from run files.

`python -m scu_sweep.report SWEEP_DIR` writes `sweep_summary.csv`, `sweep_report.md`
and `sweep_comparison.png` into a Hydra multirun directory.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Any

from ..records import atomic_write_text, read_json
from ..redact import redact_text
from .plots import plot_sweep
from .run_files import read_yaml, run_config

FINAL_KEYS = ("loss", "data_bpt", "param_bpt", "s_ratio", "lambda", "val_data_bpt", "val_s_ratio")
COLUMNS = (
    ["job", "state", "overrides", "target_s", "kp", "ki", "prior_sigma", "stop_reason",
     "prune_reason", "saturation_step", "adapter_step", "steps_run"]
    + [f"final_{k}" for k in FINAL_KEYS]
    + ["best_val_data_bpt", "tokens_seen", "wall_s", "tokens_per_s", "error"]
)
TRIAL_COLUMNS = ["trial_number", "trial_state", "trial_value"]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Numeric job subdirectories of a multirun dir, in numeric order."""
    subs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(subs, key=lambda p: int(p.name))


def _config_value(cfg: dict, key: str) -> Any:
    """``key`` of a saved job config, its interpolation resolved (``prior.sigma:
    ${model.prior_sigma}``); None when absent or unresolvable. Only this key is resolved."""
    from omegaconf import OmegaConf  # lazy: as matplotlib, only where a report is written

    return OmegaConf.select(OmegaConf.create(cfg), key, throw_on_resolution_failure=False)


def job_row(job_dir: Path) -> dict:
    """One CSV row for a job: summary.json, else failure.json, else state `missing`."""
    summary = read_json(job_dir / "summary.json")
    failure = None if summary else read_json(job_dir / "failure.json")
    src = summary or failure or {}
    cfg = run_config(job_dir)
    overrides = read_yaml(job_dir / ".hydra" / "overrides.yaml")
    if overrides is None:
        overrides = src.get("overrides") or []
    row: dict[str, Any] = {
        "job": int(job_dir.name),
        "state": "ok" if summary else ("failed" if failure else "missing"),
        "overrides": " ".join(redact_text(str(o)) for o in overrides),
        "target_s": src.get("target_s", _config_value(cfg, "target_s")),
        "kp": src.get("kp", _config_value(cfg, "controller.kp")),
        "ki": src.get("ki", _config_value(cfg, "controller.ki")),
        "prior_sigma": src.get("prior_sigma", _config_value(cfg, "prior.sigma")),
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
            ("steps_run", "steps"), ("adapter_step", "kept step"), ("target_s", "S*"),
            ("final_s_ratio", "S"), ("final_val_s_ratio", "S (val)"),
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
