"""Config schema of the ``scu_workers`` launcher, stored in Hydra's ConfigStore.

Hydra imports every ``hydra_plugins`` module at start-up: this file stays cheap.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class ScuWorkersLauncherConf:
    _target_: str = "hydra_plugins.scu_launcher.scu_launcher.ScuWorkersLauncher"
    # jobs in flight, each alone in a spawned worker process; -1: one per core (a first
    # batch of cores < J < 2·cores jobs: all J, no lone last round)
    # (-2: all cores but one, ...). conf/hydra/launcher/workers.yaml ties it to the
    # optuna sweeper's n_jobs.
    n_jobs: int = -1


ConfigStore.instance().store(group="hydra/launcher", name="scu_workers",
                             node=ScuWorkersLauncherConf, provider="scu_launcher")
