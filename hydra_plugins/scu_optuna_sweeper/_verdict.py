"""A finished job's verdict for its trial, read from the files in its run directory.

``summary.json`` with ``stop_reason: pruned`` -> PRUNED; with a finite number at the
objective key -> COMPLETE; ``failure.json``, no summary, a missing or non-finite
objective, or ``stop_reason: diverged`` -> FAIL (the study goes on).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional


@dataclass
class Verdict:
    """What a finished job means for its trial."""

    state: str  # COMPLETE | PRUNED | FAIL
    value: Optional[float] = None  # the objective, for COMPLETE
    reason: str = ""  # prune_reason or why it failed
    steps_run: Optional[int] = None


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(dotted)
        data = data[part]
    return data


def judge(job_dir: Optional[Path], objective: str) -> Verdict:
    """Read a job's verdict from its ``summary.json`` / ``failure.json``."""
    if job_dir is None:
        return Verdict("FAIL", reason="the launcher returned no job directory")
    failure = job_dir / "failure.json"
    if failure.exists():
        try:
            info = json.loads(failure.read_text())
        except ValueError:
            info = {}
        return Verdict("FAIL", reason=str(info.get("error") or info.get("stop_reason")
                                          or "failure.json"))
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return Verdict("FAIL", reason=f"no readable summary.json ({type(e).__name__})")
    steps = summary.get("steps_run")
    if summary.get("stop_reason") == "pruned":
        return Verdict("PRUNED", reason=str(summary.get("prune_reason")), steps_run=steps)
    if summary.get("stop_reason") == "diverged":
        return Verdict("FAIL", reason="diverged", steps_run=steps)
    try:
        value = float(_lookup(summary, objective))
    except (KeyError, TypeError, ValueError):
        return Verdict("FAIL", reason=f"summary.json has no number at {objective}",
                       steps_run=steps)
    if not math.isfinite(value):
        return Verdict("FAIL", reason=f"{objective} is {value}", steps_run=steps)
    return Verdict("COMPLETE", value=value, reason=str(summary.get("stop_reason")),
                   steps_run=steps)


def write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
