"""Stop reasons, run-dir file names and atomic writes. Pure (stdlib only)."""

from __future__ import annotations

import json
import math
import os
import secrets
from enum import Enum
from pathlib import Path
from typing import Any


class StopReason(str, Enum):
    SATURATED = "saturated"
    MAX_STEPS = "max_steps"
    PRUNED = "pruned"
    DIVERGED = "diverged"
    # failures written to failure.json (never to summary.json) besides "diverged":
    OUT_OF_MEMORY = "out_of_memory"
    DISK_FULL = "disk_full"
    UNWRITABLE = "unwritable"
    BAD_INPUT = "bad_input"  # a config or input refused with a one-line error (exit 2)
    ERROR = "error"  # anything else
    KILLED = "killed"  # the job's worker process died mid-job (OOM killer, segfault)


METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"
ADAPTER_DIR = "adapters"
# Pickle-based checkpoint formats (torch.save, joblib, ...): unpickling runs arbitrary code,
# so scu_sweep never reads them, as model weights or as data.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")

# Keys every metrics.jsonl row carries (DESIGN §3); evaluation rows add VAL_KEYS.
ROW_KEYS = ("step", "loss", "data_bpt", "param_bpt", "s_ratio", "lambda", "integral", "lr", "tokens", "wall_s")
VAL_KEYS = ("val_loss", "val_data_bpt")
# The numbers of summary.json an Optuna study can optimise (hydra.sweeper.objective)
OBJECTIVES = (
    tuple(f"final.{k}" for k in ("loss", "data_bpt", "param_bpt", "s_ratio", "s_ema", "lambda", "integral",
                                 "val_loss", "val_data_bpt", "val_s_ratio"))
    + ("best.val_data_bpt", "best.val_loss", "steps_run", "tokens_seen", "wall_s", "tokens_per_s")
)


def json_safe(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same dir, fsync, then rename over ``path``.

    The temp file is created 0666 less the umask, as ``open`` would create ``path`` (mkstemp's
    0600 would keep e.g. adapter_config.json from the other users who can read the weights).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(path: Path, write) -> None:
    """``write(tmp_path)`` into a temp file beside ``path``, fsync it, rename it over ``path``.

    For writers that want a path (matplotlib, safetensors): a kill leaves the old file or the new.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """The object in a JSON file, or None when the file is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list:
    """Rows of a JSONL file; a torn last line (killed writer) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
