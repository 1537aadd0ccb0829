"""Where a run's metric rows go: metrics.jsonl, a progress display, wandb (optional).

Every sink receives plain dicts of Python scalars. The training loop calls
``sinks.log(row)`` per row, ``sinks.summary(summary, adapter_dir)`` once before it
writes summary.json, and ``sinks.close()`` in ``finally``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from .config import ConfigError, plain_config
from .records import METRICS_FILE, atomic_write_text, json_safe
from .redact import env_secrets, redact_text, redacted_argv, scrub

log = logging.getLogger("scu_sweep.progress")


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


_STATUS = (("lambda", "λ {:.3g}"), ("data_bpt", "DataBPT {:.4g}"), ("val_data_bpt", "val {:.4g}"),
           ("tokens_per_s", "{:.0f} tok/s"))


def _status(row: dict, target: float) -> str:
    parts = [] if row.get("s_ratio") is None else [
        f"S {100 * row['s_ratio']:.3g}%/{100 * target:.3g}%"]
    parts += [fmt.format(row[k]) for k, fmt in _STATUS if row.get(k) is not None]
    return "  ".join(parts)


class ProgressSink:
    """A rich progress bar on a terminal; otherwise one log line every ``every`` steps."""

    def __init__(self, name: str, total: int, target: float, tty: bool | None = None,
                 every: int | None = None):
        self.name, self.total, self.target = name, total, target
        self.every = every or max(1, total // 10)
        self._bar = None
        if sys.stdout.isatty() if tty is None else tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.table import Column

            fixed = {"table_column": Column(no_wrap=True)}  # narrow terminals cut the text
            self._bar = Progress(TextColumn("[bold]{task.description}", **fixed),
                                 BarColumn(bar_width=12), MofNCompleteColumn(**fixed),
                                 TimeElapsedColumn(**fixed),
                                 TextColumn("{task.fields[info]}", **fixed), console=Console())
            self._bar.start()
            self._task = self._bar.add_task(name, total=total, info="")

    def log(self, row: dict) -> None:
        step = row.get("step", 0)
        if self._bar is not None:
            # room left of the name, a 12-wide bar, "n/N" and the elapsed time
            room = max(10, self._bar.console.width - len(self.name) - 2 * len(str(self.total)) - 27)
            info = _status(row, self.target)
            info = info if len(info) <= room else info[:room - 1] + "…"
            self._bar.update(self._task, completed=step, info=info)
        elif step == 1 or step % self.every == 0 or step == self.total:
            log.info("[%s] step %d/%d  %s", self.name, step, self.total, _status(row, self.target))

    def summary(self, summary: dict, adapter_dir: Path | None) -> None:
        final = summary.get("final") or {}
        line = (f"[{self.name}] done: {summary.get('stop_reason')} at step "
                f"{summary.get('steps_run')} (saturation {summary.get('saturation_step')})  "
                + _status(dict(final, tokens_per_s=summary.get("tokens_per_s")), self.target))
        if self._bar is not None and not log.isEnabledFor(logging.INFO):
            self._bar.console.print(line)
        else:
            log.info(line)  # also lands in Hydra's job log: one line per job

    def close(self, ok: bool) -> None:
        if self._bar is not None:
            self._bar.stop()


WANDB_ID_FILE = "scu_run_id"  # in run_dir/wandb: the wandb run a resumed run continues


def _wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The wandb run id of this run dir: kept for a run resumed from its checkpoint (online
    wandb resumes that run; offline, ``wandb sync`` puts both parts in one run), new otherwise."""
    path = run_dir / "wandb" / WANDB_ID_FILE
    if resumed and path.is_file():
        old = path.read_text().strip()
        if old.isalnum():
            return old
    new = uuid.uuid4().hex[:8]  # wandb's own ids: 8 characters of [a-z0-9]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, new + "\n")
    return new


class WandbSink:
    """One wandb run per job (offline by default, in run_dir/wandb); never stops training."""

    def __init__(self, c: dict, run_dir: Path, sweep: Path | None, resumed: bool = False):
        try:
            import wandb  # heavy and optional: only when logger.name=wandb
        except ImportError as e:
            raise ConfigError("logger.name=wandb: the wandb package is not installed; "
                              "allowed: install wandb or use logger=none") from e
        self._wandb, self.run, self._warned, self._run_dir = wandb, None, False, run_dir
        lg = c["logger"]
        secrets = env_secrets()
        overrides = scrub(_overrides(run_dir), secrets)
        group = lg.get("group") or (group_name(sweep) if sweep is not None else None)
        in_study = (c.get("pruning") or {}).get("trial_number") is not None
        config = dict(scrub(c, secrets), run_dir=str(run_dir), overrides=overrides)
        label = " ".join(overrides)[:100]
        name = (f"{run_dir.name}: {label}" if sweep is not None else label) or run_dir.name
        text = lambda v: None if v is None else redact_text(str(v), secrets)  # noqa: E731
        run_id = _wandb_run_id(run_dir, resumed)
        with redacted_argv():  # wandb's metadata records sys.argv (the command-line overrides)
            self.run = self._call("init", wandb.init, mode=lg.get("mode") or "offline",
                                  id=run_id, resume="allow",
                                  dir=str(run_dir), project=text(lg.get("project")),
                                  entity=text(lg.get("entity")), group=text(group),
                                  name=text(name),
                                  job_type="optuna-trial" if in_study else
                                  ("sweep-job" if sweep is not None else "train"),
                                  tags=scrub(list(lg.get("tags") or []), secrets), config=config,
                                  settings=wandb.Settings(console="off", silent=True,
                                                          reinit="finish_previous"))
        self._log_adapter = bool(lg.get("log_adapter", True))
        self._last_step = 0
        if self.run is not None:
            self._call("define_metric", self._define)

    def _define(self) -> None:
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.define_metric("val_data_bpt", step_metric="step", summary="min")

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        """Run one wandb call; the first failure warns once and switches wandb off."""
        if self._warned:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any wandb failure must not end training
            self._warned = True
            warnings.warn(f"wandb {what} failed ({type(e).__name__}: {e}); wandb logging is "
                          "off for the rest of this run", RuntimeWarning, stacklevel=3)
            run, self.run = self.run, None
            if run is not None:
                try:
                    run.finish(exit_code=1)
                except Exception as e2:  # noqa: BLE001 - already warned
                    log.debug("wandb finish after a failure: %s", e2)
            return None

    def log(self, row: dict) -> None:
        if self.run is not None:
            self._last_step = row.get("step", self._last_step)
            self._call("log", self.run.log, json_safe(row))

    def summary(self, summary: dict, adapter_dir: Path | None) -> None:
        if self.run is None:
            return
        self._call("summary", self.run.summary.update, scrub(json_safe(summary)))
        png = self._run_dir / "scu_run.png"
        if png.exists():
            self._call("image", lambda: self.run.log(
                {"scu_run": self._wandb.Image(str(png)), "step": self._last_step}))
        if self._log_adapter and adapter_dir is not None and Path(adapter_dir).is_dir():
            self._call("artifact", self._artifact, summary, Path(adapter_dir))

    def _artifact(self, summary: dict, adapter_dir: Path) -> None:
        meta = {k: summary.get(k) for k in ("model", "data", "target_s", "stop_reason",
                                            "adapter_step", "saturation_step", "final")}
        art = self._wandb.Artifact(f"scu-adapter-{self.run.id}", type="model",
                                   metadata=scrub(json_safe(meta)))
        for f in sorted(p for p in adapter_dir.iterdir() if p.is_file()):
            art.add_file(str(f), name=f.name)  # add_dir would print to the console
        aliases = ["latest"] + ([summary["stop_reason"]] if summary.get("stop_reason") else [])
        self.run.log_artifact(art, aliases=aliases)

    def close(self, ok: bool) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            self._call("finish", run.finish, exit_code=0 if ok else 1)


def _overrides(run_dir: Path) -> list:
    from .report import read_yaml

    return [str(o) for o in (read_yaml(Path(run_dir) / ".hydra" / "overrides.yaml") or [])]


class Sinks:
    """Fans rows out to every sink; on summary also writes the run plot and model card."""

    def __init__(self, run_dir: Path, sinks: list):
        self.run_dir, self.sinks = Path(run_dir), sinks
        self._summarised = False

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def summary(self, summary: dict, adapter_dir: Path | None) -> None:
        from .report import plot_run

        self._summarised = True
        _try("run plot", plot_run, self.run_dir, summary)
        if adapter_dir is not None:
            from .card import write_model_card

            _try("model card", write_model_card, self.run_dir, adapter_dir, summary)
        for s in self.sinks:
            s.summary(summary, adapter_dir)

    def close(self) -> None:
        if not self._summarised:  # a failed run still gets its plot
            from .report import plot_run

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
        from hydra.core.hydra_config import HydraConfig
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


def group_name(sweep: Path) -> str:
    """Hydra's date/time sweep dirs become `YYYY-MM-DD_HH-MM-SS`; others keep their name."""
    p = Path(sweep).resolve()
    if re.fullmatch(r"\d\d-\d\d-\d\d", p.name) and re.fullmatch(r"\d{4}-\d\d-\d\d", p.parent.name):
        return f"{p.parent.name}_{p.name}"
    return p.name


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
