"""Reading a run dir back: metrics.jsonl (a torn last line skipped) and Hydra's
``.hydra/*.yaml``. The report, the plots, the model card, the PEFT export and the wandb
sink read runs only through these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
    import yaml  # lazy: only where a YAML file is read

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def run_config(run_dir: Path) -> dict:
    """The job's composed config from `.hydra/config.yaml` ({} if absent)."""
    return read_yaml(Path(run_dir) / ".hydra" / "config.yaml") or {}
