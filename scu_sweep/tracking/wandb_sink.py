"""The wandb sink: one wandb run per job (offline by default), secrets scrubbed, never
stopping training. ``wandb`` itself is imported only when ``logger.name=wandb``."""

from __future__ import annotations

import logging
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..records import atomic_write_text, json_safe
from ..redact import env_secrets, redact_text, redacted_argv, scrub
from .run_files import read_yaml

log = logging.getLogger("scu_sweep.progress")


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
                                            "adapter_step", "adapter_kept", "saturation_step", "final")}
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
    return [str(o) for o in (read_yaml(Path(run_dir) / ".hydra" / "overrides.yaml") or [])]


def group_name(sweep: Path) -> str:
    """Hydra's date/time sweep dirs become `YYYY-MM-DD_HH-MM-SS`; others keep their name."""
    p = Path(sweep).resolve()
    if re.fullmatch(r"\d\d-\d\d-\d\d", p.name) and re.fullmatch(r"\d{4}-\d\d-\d\d", p.parent.name):
        return f"{p.parent.name}_{p.name}"
    return p.name
