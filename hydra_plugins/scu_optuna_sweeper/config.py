"""Config schema of the ``optuna`` sweeper, stored in Hydra's ConfigStore.

``hydra/sweeper=optuna`` selects :class:`OptunaSweeperConf`; its sampler and pruner
are config groups of their own (``hydra/sweeper/sampler=random``,
``hydra/sweeper/pruner=hyperband``). Nothing here imports Optuna: Hydra imports
every ``hydra_plugins`` module at start-up, so this file must stay cheap.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# --- samplers: `_target_` is the Optuna class; the sweeper adds `seed` (and the
# grid's search space) when it builds one.


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    n_startup_trials: int = 10  # random trials before TPE takes over
    n_ei_candidates: int = 24  # candidates scored per suggestion
    multivariate: bool = False  # model parameters jointly
    constant_liar: bool = True  # treat running trials as bad, so parallel slots spread out


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    sigma0: Optional[float] = None  # initial step size; null = 1/6 of the range
    n_startup_trials: int = 1  # random trials before CMA-ES takes over
    consider_pruned_trials: bool = False  # learn from pruned trials' last value


@dataclass
class GridSamplerConf:
    _target_: str = "optuna.samplers.GridSampler"
    # the grid itself comes from `params` (choice/range only); n_trials is capped at its size


# --- pruners: rebuilt inside each job from the study's storage (see scu_sweep.sweeps.pruning).


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # finished trials before anything is pruned
    n_warmup_steps: int = 0  # training steps before a trial can be pruned
    interval_steps: int = 1  # check every N-th reported step
    n_min_trials: int = 1  # trials that must have reported at a step to compare


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # steps before the first rung; "auto" or an int
    reduction_factor: int = 4  # keep 1/reduction_factor of trials per rung
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1  # steps of the smallest budget
    max_resource: Any = "auto"  # steps of a full run (set it to train.steps); "auto" or an int
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.scu_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # keep `sampler`/`pruner` as configs: the sweeper builds them (and ships the pruner's)
    _recursive_: bool = False
    defaults: List[Any] = field(
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}, "_self_"]
    )
    sampler: Any = MISSING  # hydra/sweeper/sampler: tpe | random | cmaes | grid
    pruner: Any = MISSING  # hydra/sweeper/pruner: median | successive_halving | hyperband | none
    direction: str = "minimize"  # minimize | maximize
    objective: str = "final.val_data_bpt"  # dotted key read from each job's summary.json
    n_trials: int = 20  # trials this sweep process runs (several processes add up)
    worker: Optional[str] = None  # which of several processes on one sweep dir this is (launchers/local_workers.sh):
    # a restart counts only this worker's finished trials towards its n_trials
    n_jobs: int = 1  # trials in flight at once; each finished trial frees its slot
    seed: Optional[int] = None  # sampler seed
    study_name: Optional[str] = None  # null = a generated name
    storage: Optional[str] = None  # Optuna URL or journal:<file>; null = SQLite in the sweep dir
    load_if_exists: bool = True  # join a study of the same name in the storage
    max_failure_rate: float = 0.5  # stop launching once failed > rate * n_trials
    pruning_key: Optional[str] = "pruning"  # job config node that gets storage/study/trial
    # search space in Hydra's override grammar, e.g. `controller.kp: interval(0.1, 2.0)`;
    # command-line overrides of the same key win
    params: Dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Put the sweeper, sampler and pruner options in the ConfigStore."""
    cs = ConfigStore.instance()
    provider = "scu_optuna_sweeper"
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider=provider)
    samplers = {"tpe": TPESamplerConf, "random": RandomSamplerConf,
                "cmaes": CmaEsSamplerConf, "grid": GridSamplerConf}
    for name, node in samplers.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider=provider)
    pruners = {"median": MedianPrunerConf, "successive_halving": SuccessiveHalvingPrunerConf,
               "hyperband": HyperbandPrunerConf, "none": NopPrunerConf}
    for name, node in pruners.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider=provider)


register()
