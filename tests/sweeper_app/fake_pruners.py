"""Pruners whose verdict is fixed, so a test knows each trial's state in advance."""

import optuna


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


class NeverPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return False
