"""Print the README's calibration tables (the seed's training-dynamics form) from a sweep.

    python benchmarks/calibration_table.py outputs/multirun/DATE/TIME

One table per job: step, loss, DataBPT, ParamBPT, S, Ŝ, λ at step 1, every 10th step and
the last, with the summary's stop reason, final Ŝ, ParamBPT, validation DataBPT and wall time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scu_sweep.records import read_jsonl  # noqa: E402  (stdlib only)


def table(job: Path) -> str:
    s = json.loads((job / "summary.json").read_text())
    rows = read_jsonl(job / "metrics.jsonl")
    last = rows[-1]["step"]
    f = s["final"]
    head = (f"**target_s={s['target_s']:g}** — stop `{s['stop_reason']}` at step {s['steps_run']}, "
            f"final Ŝ {100 * f['s_ema']:.2f} %, ParamBPT {f['param_bpt']:.4f}, "
            f"val DataBPT {f['val_data_bpt']:.3f}, wall {s['wall_s']:.0f} s")
    lines = [head, "", "| step | loss (nats) | DataBPT | ParamBPT | S % | Ŝ % | λ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["step"] == 1 or r["step"] % 10 == 0 or r["step"] == last:
            lines.append(f"| {r['step']} | {r['loss']:.3f} | {r['data_bpt']:.3f} | {r['param_bpt']:.4f} | "
                         f"{100 * r['s_ratio']:.2f} | {100 * r['s_ema']:.2f} | {r['lambda']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    sweep = Path(sys.argv[1])
    jobs = sorted((d for d in sweep.iterdir() if (d / "summary.json").exists()), key=lambda d: int(d.name))
    print("\n\n".join(table(j) for j in jobs))


if __name__ == "__main__":
    main()
