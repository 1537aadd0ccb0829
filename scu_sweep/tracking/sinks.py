"""Where a run's metric rows go: metrics.jsonl, a progress display (``progress.py``),
wandb (optional, ``wandb_sink.py``); on its summary, the run plot and the model card.

Every sink receives plain dicts of Python scalars. The training loop calls
``sinks.log(row)`` per row, ``sinks.summary(summary, adapter_dir)`` once before it
writes summary.json, and ``sinks.close()`` in ``finally``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ..config import plain_config
from ..records import METRICS_FILE, json_safe
from .card import write_model_card
from .plots import plot_run
from .progress import ProgressSink
from .wandb_sink import WandbSink


class JsonlSink:
    """Appends each row to run_dir/metrics.jsonl, flushed per line (readable while running)."""

    def __init__(self, run_dir: Path):
        self._f = open(Path(run_dir) / METRICS_FILE, "a")  # noqa: SIM115 - open for the run

    def log(self, row: dict) -> None:
        self._f.write(json.dumps(json_safe(row)) + "\n")
        self._f.flush()

    def summary(self, summary: dict, adapter_dir: Path | None) -> None:
        pass

    def close(self, ok: bool) -> None:
        self._f.close()


class Sinks:
    """Fans rows out to every sink; on summary also writes the run plot and model card."""

    def __init__(self, run_dir: Path, sinks: list):
        self.run_dir, self.sinks = Path(run_dir), sinks
        self._summarised = False

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def summary(self, summary: dict, adapter_dir: Path | None) -> None:
        self._summarised = True
        _try("run plot", plot_run, self.run_dir, summary)
        if adapter_dir is not None:
            _try("model card", write_model_card, self.run_dir, adapter_dir, summary)
        for s in self.sinks:
            s.summary(summary, adapter_dir)

    def close(self) -> None:
        if not self._summarised:  # a failed run still gets its plot
            _try("run plot", plot_run, self.run_dir)
        for s in self.sinks:
            s.close(ok=self._summarised)

    def __enter__(self) -> Sinks:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _try(what: str, fn, *args) -> Any:
    """Reports are a by-product: a failure warns and never ends the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded as a warning
        warnings.warn(f"{what} failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return None


def sweep_dir(run_dir: Path) -> Path | None:
    """The multirun dir this run belongs to, or None for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig  # lazy: a run outside Hydra has none
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    except ImportError:  # pragma: no cover
        pass
    run_dir = Path(run_dir)
    if run_dir.name.isdigit() and (run_dir.parent / "multirun.yaml").exists():
        return run_dir.parent
    return None


def make_sinks(cfg: Any, run_dir: Path, resumed: bool = False) -> Sinks:
    """metrics.jsonl + progress always; wandb when ``logger.name == "wandb"`` (a ``resumed``
    run continues its wandb run)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    c = plain_config(cfg)
    sweep = sweep_dir(run_dir)
    name = f"job {run_dir.name}" if sweep is not None else run_dir.name
    sinks: list = [JsonlSink(run_dir),
                   ProgressSink(name, int(c["train"]["steps"]), float(c["target_s"]))]
    if (c.get("logger") or {}).get("name") == "wandb":
        sinks.append(WandbSink(c, run_dir, sweep, resumed))
    return Sinks(run_dir, sinks)
