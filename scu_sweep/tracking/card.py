"""Model card (adapter_dir/README.md) and parameter_analysis.json for a kept adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..records import atomic_write_text, read_json
from ..redact import redact_text, scrub
from ..scu.mdl import param_bpt
from .run_files import read_metrics, run_config

NEAR_ZERO = 1e-4  # |w| below this counts as near zero
TOP_K = 10


def _stats(arrays: list) -> dict:
    import numpy as np  # lazy: numpy and safetensors only when an adapter is analysed

    if not arrays:
        return {"count": 0, "sum_sq": 0.0, "l2": 0.0, "std": 0.0, "mean_abs": 0.0, "near_zero_frac": 0.0}
    w = np.concatenate([a.astype(np.float64).ravel() for a in arrays])
    ssq = float(np.dot(w, w))
    return {"count": int(w.size), "sum_sq": ssq, "l2": math.sqrt(ssq), "std": float(w.std()),
            "mean_abs": float(np.abs(w).mean()),
            "near_zero_frac": float((np.abs(w) < NEAR_ZERO).mean())}


def parameter_analysis(adapter_dir: Path, sigma: float | None = None,
                       train_tokens: int | None = None) -> dict:
    """Norms of the adapter's tensors: overall, LoRA A vs B, and the top modules by L2."""
    from safetensors.numpy import load_file  # lazy, as numpy above

    tensors = load_file(str(Path(adapter_dir) / "adapters.safetensors"))
    a = [v for k, v in tensors.items() if k.endswith("lora_a")]
    b = [v for k, v in tensors.items() if k.endswith("lora_b")]
    modules: dict[str, list] = {}
    for k, v in tensors.items():
        modules.setdefault(k.rsplit(".", 1)[0], []).append(v)
    per_module = sorted(({"module": m, **_stats(vs)} for m, vs in modules.items()),
                        key=lambda r: -r["l2"])
    overall = _stats(list(tensors.values()))
    out = {"near_zero_threshold": NEAR_ZERO, "tensors": len(tensors), "overall": overall,
           "lora_a": _stats(a), "lora_b": _stats(b),
           "top_modules_by_l2": [{k: r[k] for k in ("module", "l2", "count")}
                                 for r in per_module[:TOP_K]]}
    if sigma and train_tokens:  # ParamBPT = Σw² / (2σ²N ln 2), DESIGN §2
        out["param_bpt"] = param_bpt(overall["sum_sq"], sigma, train_tokens)
    return out


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list, rows: list) -> list:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows])


def _row_at(metrics: list, step: int | None) -> dict:
    """The last metrics row at or before ``step`` (the last row when step is None)."""
    rows = [r for r in metrics if step is None or r.get("step", 0) <= step]
    return rows[-1] if rows else {}


def _dynamics(metrics: list, n: int = 10) -> list:
    if not metrics:
        return ["(no metrics.jsonl)"]
    idx = {round(i * (len(metrics) - 1) / (n - 1)) for i in range(n)}
    latest, rows = None, []
    for i, r in enumerate(metrics):
        latest = r.get("val_data_bpt", latest)
        if i in idx:
            s = r.get("s_ratio")
            rows.append([r.get("step"), r.get("loss"), r.get("data_bpt"), r.get("param_bpt"),
                         None if s is None else 100 * s, r.get("lambda"), latest])
    return _table(["step", "loss (nats)", "DataBPT", "ParamBPT", "S (%)", "λ",
                   "val DataBPT (latest)"], rows)


def _efficiency(summary: dict, cfg: dict, metrics: list) -> list:
    budget = (cfg.get("train") or {}).get("steps")
    run, sat = summary.get("steps_run"), summary.get("saturation_step")
    lines = [(f"- step budget (`train.steps`): {_f(budget)}; steps run: {_f(run)}; "
              f"stop reason: `{summary.get('stop_reason')}`")]
    if sat is None:
        lines.append("- the saturation point was not reached in this run.")
    else:
        lines.append(f"- MDL saturation point: step {sat}")
    if budget and run:
        lines.append(f"- compute saved against the full budget: {100 * (1 - run / budget):.1f} % "
                     f"of the steps ({budget - run} steps)")
    last = _row_at(metrics, None)
    cols = ([(f"saturation (step {sat})", _row_at(metrics, sat))] if sat is not None else []) + [
        (f"last logged (step {_f(last.get('step'))})", last)]
    keys = [("loss", "loss (nats)"), ("data_bpt", "DataBPT"), ("param_bpt", "ParamBPT"),
            ("s_ratio", "S (fraction)"), ("lambda", "λ")]
    lines += [""] + _table(["metric"] + [c for c, _ in cols],
                           [[h] + [r.get(k) for _, r in cols] for k, h in keys])
    return lines


def write_model_card(run_dir: Path, adapter_dir: Path, summary: dict | None = None) -> Path:
    """Write adapter_dir/README.md and adapter_dir/parameter_analysis.json; return the README.

    Both are scrubbed like the wandb config: URL passwords and the values of secret-looking
    environment variables never reach them."""
    run_dir, adapter_dir = Path(run_dir), Path(adapter_dir)
    summary = summary or read_json(run_dir / "summary.json") or {}
    cfg = run_config(run_dir)
    acfg = read_json(adapter_dir / "adapter_config.json") or {}
    lp = acfg.get("lora_parameters") or {}
    metrics = read_metrics(run_dir)
    sigma = summary.get("prior_sigma", (cfg.get("prior") or {}).get("sigma"))
    pa = parameter_analysis(adapter_dir, sigma, summary.get("train_tokens"))
    atomic_write_text(adapter_dir / "parameter_analysis.json", json.dumps(scrub(pa), indent=2) + "\n")

    base = acfg.get("model") or summary.get("model") or "?"
    data = summary.get("data") or (cfg.get("data") or {}).get("name") or "?"
    rank, scale = lp.get("rank"), lp.get("scale")
    alpha = rank * scale if rank and scale is not None else None
    final, best = summary.get("final") or {}, summary.get("best") or {}
    ctl, sat = cfg.get("controller") or {}, cfg.get("saturation") or {}
    lines = ["---", "library_name: mlx", f"base_model: {base}",
             "tags: [lora, mlx, scu, shannon-control-unit]", "---", "",
             f"# SCU LoRA adapter: {Path(str(base)).name} on {data}", "",
             ("LoRA adapter trained with a Shannon Control Unit: a PI controller sets the "
              "regularisation strength λ so that S = ParamBPT / (DataBPT + ParamBPT) tracks "
              f"the target S* = {_f(summary.get('target_s'))}. Stop reason: "
              f"`{summary.get('stop_reason')}`; the adapter holds the weights of step "
              f"{_f(summary.get('adapter_step'))} (kept: `{summary.get('adapter_kept', 'last')}`)."),
             "", "## Base model and data", ""]
    lines += _table(["item", "value"], [
        ["base model", f"`{base}`"], ["data", data],
        ["train tokens N", summary.get("train_tokens")], ["validation tokens", summary.get("val_tokens")],
        ["tokens seen", summary.get("tokens_seen")], ["throughput (tokens/s)", summary.get("tokens_per_s")],
        ["wall time (s)", summary.get("wall_s")]])
    lines += ["", "## LoRA", ""] + _table(["item", "value"], [
        ["rank r", rank], ["alpha α", alpha], ["scale α/r", scale], ["dropout", lp.get("dropout")],
        ["layers (last N blocks)", acfg.get("num_layers")],
        ["target modules", ", ".join(lp.get("keys") or [])],
        ["trainable parameters", summary.get("trainable_params", pa["overall"]["count"])]])
    lines += ["", "## SCU parameters", ""] + _table(["parameter", "value"], [
        ["target S*", summary.get("target_s")], ["prior σ", sigma],
        ["Kp", summary.get("kp", ctl.get("kp"))], ["Ki", summary.get("ki", ctl.get("ki"))]]
        + [[f"controller.{k}", ctl[k]] for k in ("deadband", "ema_alpha", "leak", "i_min",
                                                  "i_max", "lambda_init", "lambda_min",
                                                  "lambda_max") if k in ctl]
        + [[f"saturation.{k}", v] for k, v in sat.items()])
    lines += ["", f"## Final metrics (step {_f(summary.get('adapter_step'))})", ""] + _table(
        ["metric", "value"],
        [["loss (nats/token)", final.get("loss")], ["DataBPT (bits/token)", final.get("data_bpt")],
         ["ParamBPT (bits/token)", final.get("param_bpt")], ["S (fraction)", final.get("s_ratio")],
         ["λ", final.get("lambda")], ["val loss (nats/token)", final.get("val_loss")],
         ["val DataBPT", final.get("val_data_bpt")],
         ["S from ParamBPT and val DataBPT", final.get("val_s_ratio")],
         [f"best val DataBPT (step {_f(best.get('val_step'))})", best.get("val_data_bpt")]])
    lines += ["", "## Training dynamics", ""] + _dynamics(metrics)
    lines += ["", "## Efficiency analysis", ""] + _efficiency(summary, cfg, metrics)
    o, la, lb = pa["overall"], pa["lora_a"], pa["lora_b"]
    lines += ["", "## Parameter analysis", "",
              f"Σw² = {_f(o['sum_sq'])}, L2 = {_f(o['l2'])}, near-zero fraction "
              f"(|w| < {NEAR_ZERO:g}) = {100 * o['near_zero_frac']:.2f} %"
              + (f", ParamBPT from the tensors = {_f(pa['param_bpt'])}" if "param_bpt" in pa else "")
              + ".", ""]
    lines += _table(["tensors", "count", "std", "L2", "mean abs", "near zero (%)"],
                    [[n, s["count"], s["std"], s["l2"], s["mean_abs"], 100 * s["near_zero_frac"]]
                     for n, s in (("LoRA A", la), ("LoRA B", lb))])
    lines += ["", f"Top {len(pa['top_modules_by_l2'])} modules by L2 norm:", ""]
    lines += _table(["module", "L2", "parameters"],
                    [[f"`{m['module']}`", m["l2"], m["count"]] for m in pa["top_modules_by_l2"]])
    lines += ["", "## Usage", "", "```python", "from mlx_lm import load, generate", "",
              f'model, tokenizer = load("{base}", adapter_path="{adapter_dir}")',
              'print(generate(model, tokenizer, prompt="Hello", max_tokens=50))', "```", "",
              "For Transformers + PEFT: `python -m scu_sweep.export_peft RUN_DIR OUT`.", ""]
    out = adapter_dir / "README.md"
    atomic_write_text(out, redact_text("\n".join(lines)))  # paths and names may carry URL passwords
    return out
