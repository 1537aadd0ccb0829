"""Hydra callback: the sweep's own report once every job of a multirun has ended."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from .report import write_sweep_report

        path = write_sweep_report(Path(config.hydra.sweep.dir))
        log.info("sweep report: %s", path)
