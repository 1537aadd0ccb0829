"""How a training run talks to its Optuna trial.

The optuna sweeper passes each job ``pruning.storage``, ``pruning.study_name`` and
``pruning.trial_number``. :func:`make_reporter` turns them into an
:class:`OptunaReporter`, which reopens that trial from the shared storage, so the job
may run in another process or on another machine. Without them the run gets a
:class:`NullReporter`. The pruner is rebuilt in the job from the spec the sweeper
stored in the study (``PRUNER_ATTR``), because the pruner, not the sweeper, decides.

Only the standard library is imported here; Optuna is imported when a study is used.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from typing import Any, Dict, Optional, Protocol, runtime_checkable

log = logging.getLogger(__name__)
PRUNER_ATTR = "scu_sweep.pruner"  # study user attr: {"_target_": "pkg.Class", **kwargs}
JOURNAL_PREFIX = "journal:"  # storage "journal:<path>" = Optuna journal file storage
_LINK_KEYS = ("storage", "study_name", "trial_number")


@runtime_checkable
class Reporter(Protocol):
    """Receives validation values; ``report`` returns True when the run must stop."""

    in_study: bool  # True inside an Optuna study: an unreachable target prunes at once

    def report(self, step: int, value: float) -> bool: ...


class NullReporter:
    """A run outside a study: nothing is recorded, nothing is pruned."""

    in_study = False

    def report(self, step: int, value: float) -> bool:
        return False


class OptunaReporter:
    """Reports to trial ``trial_number`` of ``study_name`` in ``storage`` and asks its pruner."""

    in_study = True

    def __init__(self, storage: str, study_name: str, trial_number: int) -> None:
        import optuna

        backend = open_storage(storage)
        study = optuna.load_study(study_name=study_name, storage=backend,
                                  sampler=optuna.samplers.RandomSampler())
        study.pruner = build_pruner(study.user_attrs.get(PRUNER_ATTR))
        study_id = backend.get_study_id_from_name(study_name)
        trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, int(trial_number))
        self.trial_number = int(trial_number)
        self.pruned_step: Optional[int] = None
        self._trial = None
        state = backend.get_trial(trial_id).state
        if state.is_finished():  # e.g. a finished trial's overrides run again by hand
            log.warning("trial %d of study %s is already %s: this run reports to no study",
                        self.trial_number, study_name, state.name)
            self.in_study = False
        else:
            self._trial = optuna.trial.Trial(study, trial_id)

    def report(self, step: int, value: float) -> bool:
        """Record ``value`` at ``step``; a non-finite value is skipped (the run handles it)."""
        value = float(value)
        if self._trial is None or not math.isfinite(value):
            return False
        self._trial.report(value, int(step))
        if self._trial.should_prune():
            self.pruned_step = int(step)
            return True
        return False


def _field(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


def make_reporter(pruning_cfg: Any) -> Reporter:
    """An :class:`OptunaReporter` when all of storage/study_name/trial_number are set.

    Args:
        pruning_cfg: the ``pruning`` config node (a DictConfig, dict or object), or None.
    """
    values = {k: _field(pruning_cfg, k) for k in _LINK_KEYS}
    missing = [f"pruning.{k}" for k, v in values.items() if v is None]
    if len(missing) == len(_LINK_KEYS):
        return NullReporter()
    if missing:
        raise ValueError(f"{', '.join(missing)}=None: allowed all of pruning.storage, "
                         "pruning.study_name, pruning.trial_number set (by the optuna sweeper) "
                         "or none")
    return OptunaReporter(str(values["storage"]), str(values["study_name"]),
                          int(values["trial_number"]))


def build_pruner(spec: Optional[Dict[str, Any]]) -> Any:
    """Instantiate ``{"_target_": "pkg.Class", **kwargs}``; None gives Optuna's NopPruner."""
    if not spec:
        spec = {"_target_": "optuna.pruners.NopPruner"}
    import optuna

    kwargs = dict(spec)
    target = str(kwargs.pop("_target_"))
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    # the spec comes from the study's storage: never call anything but a pruner class
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        raise ValueError(f"hydra.sweeper.pruner._target_={target}: allowed an optuna.pruners.BasePruner subclass")
    return cls(**kwargs)


def _retry(fn: Any, tries: int = 6, wait_s: float = 0.2) -> Any:
    """Call ``fn``; retry errors from concurrent schema creation by several processes."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - re-raised below unless a known race
            race = type(e).__name__ in ("OperationalError", "IntegrityError", "ProgrammingError")
            if not race or attempt == tries - 1:
                raise
            time.sleep(wait_s * (attempt + 1))


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: ``journal:<path>`` or any SQLAlchemy URL.

    SQLite gets a long busy timeout, so several processes can share one file.
    """
    import optuna

    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        path = path[2:] if path.startswith("//") else path
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    return _retry(lambda: optuna.storages.RDBStorage(url, **kwargs))


def display_url(url: str) -> str:
    """``url`` with any password masked, for logs and result files."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
