"""The optuna sweeper's work: the study, the trial slots, telling, results.

Each of ``n_jobs`` threads owns one slot: it asks the study for a trial, hands the
configured launcher a batch of one job (job number = trial number), reads the job's
verdict from its files, tells the study, then asks again. A finished or pruned trial
frees its slot at once; there is no batch barrier. Launchers that run the job inside
this process (Hydra's basic launcher) share global state between jobs, so their
launches are serialised; process launchers (joblib/loky, submitit) run in parallel.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from scu_sweep.records import OBJECTIVES
from scu_sweep.sweeps import pruning
from scu_sweep.sweeps.resume import process_token, token_alive

from ._space import format_value, grid, quote, search_space
from ._verdict import Verdict, judge, write_json

log = logging.getLogger(__name__)
_STATES = {"COMPLETE": optuna.trial.TrialState.COMPLETE,
           "PRUNED": optuna.trial.TrialState.PRUNED, "FAIL": optuna.trial.TrialState.FAIL}
SWEEP_ATTR = "scu_sweep.sweep_dir"  # which sweep dir ran the trial (its restart finds it)
JOB_ATTR = "scu_sweep.job_num"  # the job dir a re-queued trial continues in
INTERRUPTED_ATTR = "scu_sweep.interrupted"
OWNER_ATTR = "scu_sweep.owner"  # the sweep process running the trial (resume.process_token)
WORKER_ATTR = "scu_sweep.worker"  # hydra.sweeper.worker of that process (several workers share a sweep dir)


def _job_dir(ret: Optional[JobReturn]) -> Optional[Path]:
    out = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret and ret.hydra_cfg \
        else None
    return Path(out) if out else None


def _runs_in_process(launcher: Any) -> bool:
    """True for launchers that run the job in this process (their jobs share globals)."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    if type(launcher).__module__.startswith("hydra_plugins.scu_launcher"):
        return False  # always worker processes, even with one slot
    joblib_cfg = getattr(launcher, "joblib", None)
    return isinstance(launcher, BasicLauncher) or (
        joblib_cfg is not None and joblib_cfg.get("n_jobs") == 1)


class SweeperConfigError(ValueError):
    """A bad ``hydra.sweeper.*`` value; one line naming the key and what is allowed."""


def check_group(key: str, value: Any, choices: str) -> None:
    """``hydra.sweeper.<key>`` must be a config chosen from its group, not a plain value."""
    if not isinstance(value, (DictConfig, dict)):
        raise SweeperConfigError(
            f"hydra.sweeper.{key}={value!r}: allowed a config group choice, set as hydra/sweeper/{key}=NAME "
            f"(NAME one of {choices}; note the slashes)")


def resolve_storage(storage: Optional[str], sweep_dir: Path) -> str:
    """The storage URL every job can open: default SQLite file, relative paths made absolute."""
    if not storage:
        return f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    if storage.startswith(pruning.JOURNAL_PREFIX):
        path = storage[len(pruning.JOURNAL_PREFIX):]
        path = path[2:] if path.startswith("//") else path
        return pruning.JOURNAL_PREFIX + str(Path(path).resolve())
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):]
        if not path or path.startswith(":memory:") or "mode=memory" in path:
            raise SweeperConfigError("hydra.sweeper.storage: an in-memory SQLite database cannot be "
                                     "shared with the jobs; allowed a file, e.g. sqlite:///study.db")
        return f"sqlite:///{Path(path).resolve()}"
    try:
        make_url(storage)
    except ArgumentError:
        raise SweeperConfigError(
            f"hydra.sweeper.storage={storage!r}: allowed a database URL (sqlite:///study.db, "
            f"postgresql://host/db) or an Optuna journal file as {pruning.JOURNAL_PREFIX}{storage}") from None
    return storage


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: Any, pruner: Any, params: Optional[Dict[str, Any]] = None,
                 **cfg: Any) -> None:
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.cfg = cfg  # the remaining fields of OptunaSweeperConf
        rules = {"direction": (cfg["direction"] in ("minimize", "maximize"), "minimize, maximize"),
                 "n_jobs": (cfg["n_jobs"] >= 1, "an int >= 1"),
                 "n_trials": (cfg["n_trials"] >= 0, "an int >= 0"),
                 "max_failure_rate": (cfg["max_failure_rate"] >= 0, "a float >= 0"),
                 "objective": (cfg["objective"] in OBJECTIVES, "a number of summary.json: "
                               + ", ".join(OBJECTIVES))}
        bad = [f"hydra.sweeper.{k}={cfg[k]!r}: allowed {allowed}"
               for k, (ok, allowed) in rules.items() if not ok]
        if bad:
            raise SweeperConfigError("; ".join(bad))
        check_group("sampler", sampler, "tpe, random, cmaes, grid")
        check_group("pruner", pruner, "median, successive_halving, hyperband, none")
        self._lock = threading.Lock()  # guards the study's ask/tell and the counters

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # -- building the study

    def _parse(self, arguments: List[str]) -> None:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        self.fixed, self.space = search_space(parser.parse_overrides(lines))

    def _make_study(self, storage: str) -> optuna.Study:
        kwargs = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        kwargs["seed"] = self.cfg["seed"]
        if kwargs["_target_"].endswith("GridSampler"):
            kwargs["search_space"] = grid(self.space)
        sampler = instantiate(kwargs)
        pruner_spec = OmegaConf.to_container(self.pruner_cfg, resolve=True)
        backend = pruning.open_storage(storage)
        name = self.cfg["study_name"]
        if name is None and self.private_storage:  # a restarted sweep
            names = optuna.get_all_study_names(backend)
            name = names[0] if len(names) == 1 else None
        study = pruning._retry(lambda: optuna.create_study(
            storage=backend, sampler=sampler, pruner=pruning.build_pruner(pruner_spec),
            study_name=name, direction=self.cfg["direction"],
            load_if_exists=self.cfg["load_if_exists"]))
        study.set_user_attr(pruning.PRUNER_ATTR, pruner_spec)
        study.set_user_attr("scu_sweep.objective", self.cfg["objective"])
        self.backend = backend
        return study

    def _recover(self) -> int:
        """After a kill: this sweep dir's RUNNING trials whose sweep process is gone are marked
        interrupted, told FAIL and re-queued with their parameters (continuing in their job
        dir); those of a live process (or one on another host) are left alone. Returns how
        many of this sweep dir's trials had finished in processes that are gone, counting only
        those of this ``hydra.sweeper.worker`` (a sibling worker may have finished before this
        one started)."""
        done = 0
        for t in self.study.get_trials(deepcopy=False):
            running = t.state == optuna.trial.TrialState.RUNNING
            # the sweep dir's own storage is this sweep's alone (we hold the dir's lock): all of
            # its RUNNING trials are ours, also one killed before it was tagged with SWEEP_ATTR
            if t.user_attrs.get(SWEEP_ATTR) != str(self.sweep_dir) and not (self.private_storage and running):
                continue
            owner = t.user_attrs.get(OWNER_ATTR)
            if owner and token_alive(owner) is not False:
                # another live sweep process on this dir runs it, or finished it as part of its own
                # n_trials (launchers/local_workers.sh: workers start at slightly different times)
                continue
            if running:
                self.backend.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                if t.params:  # one killed before its parameters were drawn never ran
                    self.study.enqueue_trial(t.params, user_attrs={
                        JOB_ATTR: t.user_attrs.get(JOB_ATTR, t.number), SWEEP_ATTR: str(self.sweep_dir)})
                log.warning("trial %d was interrupted: %s", t.number, "re-queued" if t.params else "dropped")
            elif (t.state.is_finished() and not t.user_attrs.get(INTERRUPTED_ATTR)
                  and t.user_attrs.get(WORKER_ATTR) == self.cfg["worker"]):
                done += 1  # not a sibling worker's that finished before this one started
        return done

    def _job_overrides(self, params: Dict[str, Any], trial_number: int) -> List[str]:
        out = self.fixed + [f"{k}={format_value(v)}" for k, v in params.items()]
        key = self.cfg["pruning_key"]
        if key:
            out += [f"{key}.storage={quote(self.storage)}",
                    f"{key}.study_name={quote(self.study.study_name)}",
                    f"{key}.trial_number={trial_number}"]
        return out

    # -- the sweep

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        resolve_storage(self.cfg["storage"], sweep_dir)  # a bad storage fails before anything is written
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self._parse(arguments)
        self.sweep_dir = sweep_dir
        self.storage = resolve_storage(self.cfg["storage"], sweep_dir)
        self.private_storage = self.storage == resolve_storage(None, sweep_dir)  # optuna.db in the sweep dir
        self.owner = process_token()
        self.study = self._make_study(self.storage)
        n_trials = self.cfg["n_trials"]
        if isinstance(self.study.sampler, optuna.samplers.GridSampler):
            n_trials = min(n_trials, math.prod(len(v) for v in grid(self.space).values()))
        finished = self._recover()
        if finished:
            log.info("%d trials of %s had finished before; running the other %d",
                     finished, sweep_dir, max(n_trials - finished, 0))
        n_trials = max(n_trials - finished, 0)
        first = {k: _probe(d) for k, d in self.space.items()}
        self.validate_batch_is_legal([self._job_overrides(first, 0)])  # fail fast on typos
        log.info("Study %s in %s: %d trials, %d in flight, pruner %s", self.study.study_name,
                 pruning.display_url(self.storage), n_trials, self.cfg["n_jobs"],
                 self.pruner_cfg["_target_"])
        self.n_trials, self.remaining, self.failed, self.stop = n_trials, n_trials, 0, False
        self.stopped: Optional[str] = None  # why the study stopped launching trials early
        self.error: Optional[BaseException] = None  # first error of a slot thread
        self.verdicts: Dict[int, Verdict] = {}
        self.returns: Dict[int, JobReturn] = {}
        serial = _runs_in_process(self.launcher)
        self._launch_guard = threading.Lock() if serial else contextlib.nullcontext()
        if serial and self.cfg["n_jobs"] > 1:
            log.warning("%s runs jobs inside this process: trials run one at a time; use a "
                        "process launcher (e.g. hydra/launcher=workers, the default) for n_jobs > 1",
                        type(self.launcher).__name__)
        threads = [threading.Thread(target=self._slot, name=f"optuna-slot-{i}", daemon=True)
                   for i in range(min(self.cfg["n_jobs"], max(n_trials, 1)))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.stop = True
            self._write_results(sweep_dir)
        if self.error is not None:
            raise self.error
        if self.stopped is not None:
            # Hydra runs on_multirun_end only after a sweep returns; a study stopped for its
            # failures has ended too, so its callbacks (the sweep report) run before the error
            self.hydra_context.callbacks.on_multirun_end(config=self.config)
            raise HydraException(self.stopped)
        return [[self.returns[n] for n in sorted(self.returns)]]

    def _slot(self) -> None:
        try:
            while True:
                with self._lock:
                    if self.stop or self.remaining <= 0:
                        return
                    self.remaining -= 1
                    trial = self.study.ask(self.space)
                    trial.set_user_attr(SWEEP_ATTR, str(self.sweep_dir))
                    trial.set_user_attr(OWNER_ATTR, self.owner)
                    if self.cfg["worker"] is not None:
                        trial.set_user_attr(WORKER_ATTR, self.cfg["worker"])
                self._run_trial(trial)
        except BaseException as e:  # e.g. the storage went away: stop, re-raised by sweep()
            with self._lock:
                self.stop = True
                self.error = self.error or e

    def _run_trial(self, trial: optuna.Trial) -> None:
        overrides = self._job_overrides(trial.params, trial.number)
        job_num = trial.user_attrs.get(JOB_ATTR, trial.number)  # a re-queued trial resumes its job
        ret: Optional[JobReturn] = None
        try:
            with self._launch_guard:
                ret = self.launcher.launch([overrides], initial_job_idx=job_num)[0]
        except Exception:  # noqa: BLE001 - a launcher error fails this trial, not the study
            log.exception("trial %d: the launcher failed", trial.number)
        job_dir = _job_dir(ret)
        verdict = judge(job_dir, self.cfg["objective"])
        if ret is not None and ret.status == JobStatus.FAILED:
            error = ret._return_value  # the job's exception; reading .return_value re-raises it
            log.error("trial %d: the job raised %r", trial.number, error, exc_info=error)
            verdict.reason = f"{verdict.reason}; the job raised {error!r}"
        with self._lock:
            self._tell(trial, verdict, job_dir)
            if ret is not None:
                self.returns[trial.number] = ret
        log.info("trial %d: %s %s%s", trial.number, verdict.state,
                 "" if verdict.value is None else f"{verdict.value:.6g} ", verdict.reason)
        if job_dir is not None and job_dir.is_dir():
            write_json(job_dir / "trial.json", {
                "number": trial.number, "state": verdict.state, "value": verdict.value,
                "params": trial.params, "study_name": self.study.study_name,
                "reason": verdict.reason, "steps_run": verdict.steps_run})

    def _tell(self, trial: optuna.Trial, verdict: Verdict, job_dir: Optional[Path]) -> None:
        try:
            trial.set_user_attr("job_dir", str(job_dir) if job_dir else None)
            trial.set_user_attr("reason", verdict.reason)
            trial.set_user_attr("steps_run", verdict.steps_run)
            self.study.tell(trial, verdict.value if verdict.state == "COMPLETE" else None,
                            state=_STATES[verdict.state])
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
            if not self.backend.get_trial(trial._trial_id).state.is_finished():
                raise
            # another process told it first (it took this live trial for an interrupted one)
            log.warning("trial %d: %s; this sweep's verdict was %s", trial.number, e, verdict.state)
        except RuntimeError:  # the grid sampler stops the study once the grid is done
            if not isinstance(self.study.sampler, optuna.samplers.GridSampler):
                raise
            self.stop = True
        self.verdicts[trial.number] = verdict
        if verdict.state == "FAIL":
            self.failed += 1
            rate = self.cfg["max_failure_rate"]
            if self.failed > rate * self.n_trials and self.stopped is None:
                self.stopped = (f"{self.failed} of {len(self.verdicts)} trials failed, more than "
                                f"hydra.sweeper.max_failure_rate={rate} x n_trials={self.n_trials} "
                                "allows: no new trials")
                log.error("%s", self.stopped)
                self.stop = True

    def _write_results(self, sweep_dir: Path) -> None:
        mine = list(self.verdicts.values())
        counts = {s.lower(): sum(v.state == s for v in mine) for s in _STATES}
        steps = sum(v.steps_run or 0 for v in mine)
        complete = self.study.get_trials(deepcopy=False,
                                         states=(optuna.trial.TrialState.COMPLETE,))
        best = self.study.best_trial if complete else None
        results = {
            "name": "optuna", "study_name": self.study.study_name,
            "storage": pruning.display_url(self.storage), "direction": self.cfg["direction"],
            "objective": self.cfg["objective"],
            "best_params": dict(best.params) if best else None,
            "best_value": best.value if best else None,
            "best_trial": best.number if best else None,
            "stopped": self.stopped,  # why no new trials were launched (failures), or null
            "trials": counts,  # this sweep process's trials
            "total_steps": steps,  # training steps of this process's trials together
            "study": {s.name.lower(): n for s, n in _study_counts(self.study).items()},
            "dashboard": "optuna-dashboard " + pruning.display_url(
                self.storage.removeprefix(pruning.JOURNAL_PREFIX)),
        }
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info("Trials: %d complete, %d pruned, %d failed; %d training steps in all",
                 counts["complete"], counts["pruned"], counts["fail"], steps)
        log.info("Best: %s = %s with %s", self.cfg["objective"], results["best_value"],
                 results["best_params"])


def _probe(dist: optuna.distributions.BaseDistribution) -> Any:
    """Any value of ``dist`` (to compose one job config before the study starts)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices[0]
    return dist.low


def _study_counts(study: optuna.Study) -> Dict[Any, int]:
    """Trials per state in the whole study (all sweep processes on this storage)."""
    counts: Dict[Any, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts
