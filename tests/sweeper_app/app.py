"""Tiny Hydra app used by the sweeper tests in place of ``python -m scu_sweep``."""

import json
import math
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from scu_sweep.sweeps.pruning import make_reporter


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    t0 = time.time()
    reporter = make_reporter(cfg.pruning)
    base = (cfg.x - 0.3) ** 2 + (cfg.y - 0.2) ** 2 + 1.0
    slow = cfg.pruning.trial_number is not None and cfg.pruning.trial_number == cfg.slow_trial
    stop, reason, step, value = "max_steps", None, 0, float("nan")
    if cfg.mode == "raise":
        raise RuntimeError("boom")
    for step in range(1, cfg.steps + 1):
        time.sleep(cfg.slow_step_s if slow else cfg.step_s)
        if step % cfg.eval_every:
            continue
        value = base + 1.0 / step
        if cfg.mode == "diverge":
            _write(run_dir / "failure.json", {"stop_reason": "diverged",
                                              "error": "non-finite loss at step %d" % step})
            return float("nan")
        if cfg.mode == "unreachable" and reporter.in_study:
            stop, reason = "pruned", "unreachable"
            break
        if reporter.report(step, value):
            stop, reason = "pruned", "pruner"
            break
    if cfg.mode == "nanobjective":
        value = float("nan")
    summary = {"final": {"val_data_bpt": value}, "stop_reason": stop, "prune_reason": reason,
               "steps_run": step, "pid": os.getpid(), "t_start": t0, "t_end": time.time(),
               "x": cfg.x, "y": cfg.y}
    _write(run_dir / "summary.json", summary)
    return value if math.isfinite(value) else float("nan")


if __name__ == "__main__":
    main()
