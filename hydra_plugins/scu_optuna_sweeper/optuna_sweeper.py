"""The public Sweeper class; the work happens in ``_impl`` (imported lazily)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, Iterator, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import OptunaSweeperConf  # noqa: F401  (registers the configs)


class OptunaSweeper(Sweeper):
    """Runs an Optuna study over Hydra jobs, ``n_jobs`` trials in flight, with pruning."""

    def __init__(self, sampler: Any, pruner: Any, params: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        from ._impl import OptunaSweeperImpl  # lazy: Optuna loads only when this sweeper is used

        with _one_line_errors():
            self._impl = OptunaSweeperImpl(sampler=sampler, pruner=pruner, params=params, **kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        with _one_line_errors():
            return self._impl.sweep(arguments)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A bad ``hydra.sweeper.*`` value: one line on stderr and exit 2, as for the run's own keys."""
    from ._impl import SweeperConfigError  # lazy, as above

    try:
        yield
    except SweeperConfigError as e:
        print(f"scu_sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
