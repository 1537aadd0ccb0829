"""The progress display of a run: a rich bar on a terminal, else a log line every ``every`` steps."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("scu_sweep.progress")


_STATUS = (("lambda", "λ {:.3g}"), ("data_bpt", "DataBPT {:.4g}"), ("val_data_bpt", "val {:.4g}"),
           ("tokens_per_s", "{:.0f} tok/s"))


# besides S itself (this batch's DataBPT): Ŝ, the S the controller holds (its smoothed DataBPT),
# and S from validation DataBPT where the row was evaluated (what saturation.keep judges)
_S_VIEWS = (("s_ema", "Ŝ {:.3g}%"), ("val_s_ratio", "val S {:.3g}%"))


def _status(row: dict, target: float) -> str:
    parts = [] if row.get("s_ratio") is None else [
        f"S {100 * row['s_ratio']:.3g}%/{100 * target:.3g}%"]
    parts += [fmt.format(100 * row[k]) for k, fmt in _S_VIEWS if row.get(k) is not None]
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
            from rich.console import Console  # lazy: only on a terminal
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
                f"{summary.get('steps_run')} (saturation {summary.get('saturation_step')}), kept step "
                f"{summary.get('adapter_step')} ({summary.get('adapter_kept')})  "
                + _status(dict(final, tokens_per_s=summary.get("tokens_per_s")), self.target))
        if self._bar is not None and not log.isEnabledFor(logging.INFO):
            self._bar.console.print(line)
        else:
            log.info(line)  # also lands in Hydra's job log: one line per job

    def close(self, ok: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
