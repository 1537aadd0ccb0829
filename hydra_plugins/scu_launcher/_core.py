"""The ``scu_workers`` launcher's work: slots, submission, dead workers, interrupts.

Each of ``n_jobs`` slots owns a loky ``ProcessPoolExecutor`` with one worker (a fresh
process, never a fork: MLX needs that), made on first use and kept for the slot's next
jobs. A job runs hydra-joblib-launcher's ``execute_job`` there, as with
``hydra/launcher=joblib``. When a worker dies, only its slot's pool breaks: that job
gets ``failure.json`` (``stop_reason: killed``) and a FAILED ``JobReturn``, the slot a
new pool, and the other jobs go on. Launches from several threads (the optuna sweeper)
share the slots. An interrupt, or the interpreter exiting with jobs still running,
kills every worker; a launch that ends with no other launch running stops the workers.
A worker whose sweep process was SIGKILLed kills itself (``scu_sweep.sweeps.lifeline``).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher._core import execute_job
from joblib.externals.loky import ProcessPoolExecutor, cpu_count
from joblib.externals.loky.backend.context import get_context
from joblib.externals.loky.process_executor import (
    BrokenProcessPool,
    ShutdownExecutorError,
    TerminatedWorkerError,
)

from scu_sweep.sweeps.lifeline import die_with_parent
from scu_sweep.training import core_share
from scu_sweep.training.backend import batch_scheduling

from ._failures import COMPOSE_LOCK, dead_job, death, failed_job

log = logging.getLogger(__name__)

_POOLS: "weakref.WeakSet[Pool]" = weakref.WeakSet()
FEWER_AFTER_S = 2.0


def start_worker(parent: int, share: Optional[tuple] = None) -> None:
    """A worker's initializer: die with the sweep process, run as a batch (CPU-bound) task,
    since the jobs of a sweep may outnumber the cores (``n_slots``), and take the cores of
    finished jobs (``training.core_share``)."""
    die_with_parent(parent)
    batch_scheduling()
    core_share.use(share)


class Slot:
    """One job at a time, in the single worker process of its own pool."""

    def __init__(self, share: Optional[tuple]) -> None:
        self.executor: Optional[ProcessPoolExecutor] = None
        self.workers: List[Any] = []  # the pool's worker processes, for their exit codes
        self.share = share

    def submit(self, *args: Any) -> Any:
        for _ in range(2):
            new = self.executor is None
            if new:
                self.executor = ProcessPoolExecutor(max_workers=1, context=get_context("loky"),
                                                    initializer=start_worker,
                                                    initargs=(os.getpid(), self.share))
            try:
                future = self.executor.submit(execute_job, *args)
            except (BrokenProcessPool, ShutdownExecutorError):  # its worker died while idle
                _shut(self.detach())
                continue
            if new:
                _hook_exit()
            # the worker starts inside submit(); private, so only for the exit code
            self.workers = list(getattr(self.executor, "_processes", {}).values())
            return future
        raise RuntimeError("could not start a worker process")

    def detach(self) -> Optional[ProcessPoolExecutor]:
        """Take the pool off the slot (the next job starts a new one); the caller shuts it down."""
        executor, self.executor = self.executor, None
        return executor


class Pool:
    """The slots of one launcher, shared by its concurrent launches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cond = threading.Condition()
        # one BLAS thread per job, chosen by sweeps.callbacks: the jobs left take the idle cores
        self.share = None
        if size > 1 and os.environ.get(core_share.ENV_VAR) == "1":
            self.share = core_share.create(cpu_count())
        if self.share is not None:
            weakref.finalize(self, core_share.remove, self.share)
        self.running = 0  # as last published
        self.fewer_since: Optional[float] = None  # when fewer jobs than published began to run
        self.slots = [Slot(self.share) for _ in range(size)]
        self.free = list(self.slots)
        self.launches = 0  # launches in progress
        self.stopped = False

    def publish(self) -> None:
        """Under ``cond``: tell the workers how many jobs run now, if that changed; fewer only
        after ``FEWER_AFTER_S`` (the optuna sweeper starts each trial's job in a new launch, so
        between two trials a slot is free for a moment)."""
        running = self.size - len(self.free)
        if self.share is None or running == self.running:
            self.fewer_since = None
            return
        if running < self.running:
            now = time.monotonic()
            self.fewer_since = self.fewer_since or now
            if now - self.fewer_since < FEWER_AFTER_S:
                return
        core_share.publish(self.share, running)
        self.running, self.fewer_since = running, None

    def wake(self, _future: Any = None) -> None:
        with self.cond:
            self.cond.notify_all()

    def abandon(self, slots: List[Slot]) -> None:
        """Kill the workers of these busy slots and free the slots."""
        with self.cond:
            executors = [s.detach() for s in slots]
            self.free.extend(slots)
            self.cond.notify_all()
        for executor in executors:
            _shut(executor, kill_workers=True)

    def stop(self) -> None:
        """Kill every worker (and its children) now; later launches raise KeyboardInterrupt."""
        with self.cond:
            self.stopped = True
            executors = [s.executor for s in self.slots if s.executor is not None]
            for s in self.slots:
                s.executor = None
            self.cond.notify_all()
        for executor in executors:
            _shut(executor, kill_workers=True)


def _shut(executor: Optional[ProcessPoolExecutor], wait: bool = False,
          kill_workers: bool = False) -> None:
    if executor is not None:
        executor.shutdown(wait=wait, kill_workers=kill_workers)


def _stop_all() -> None:
    for pool in list(_POOLS):
        pool.stop()


def _hook_exit() -> None:
    """Kill the workers when the interpreter exits with jobs still running (the optuna
    sweeper's slot threads, after Ctrl-C in its main thread). loky adds a hook that waits
    for its pool's running jobs each time a pool starts; these hooks run in reverse order,
    so ours goes in again after each new pool, to run before loky's."""
    try:
        getattr(threading, "_register_atexit", atexit.register)(_stop_all)
    except RuntimeError:  # the interpreter is shutting down already
        pass


def _exiting(pool: Pool) -> bool:
    """The pool was stopped, or the interpreter exits (also when a hook of loky's that
    waits for running jobs got to run before ours)."""
    return pool.stopped or getattr(threading, "_SHUTTING_DOWN", False)


def n_slots(n_jobs: int, n_batch: int = 0) -> int:
    """joblib's meaning of n_jobs: -1 = one per core, -2 = all cores but one, ...

    With -1, a first batch of more jobs than cores but fewer than twice as many runs all at
    once: in two rounds the second would leave cores idle (3 jobs on 2 cores: 3 at a time
    finish in ~3/4 of the time, one BLAS thread each)."""
    if n_jobs > 0:
        return n_jobs
    cores = max(cpu_count() + 1 + n_jobs, 1)
    return n_batch if n_jobs == -1 and cores < n_batch < 2 * cores else cores


def _pool(launcher: Any, n_batch: int) -> Pool:
    with launcher.lock:
        if launcher.pool is None:
            setup_globals()
            launcher.pool = Pool(n_slots(launcher.joblib["n_jobs"], n_batch))
            _POOLS.add(launcher.pool)
        return launcher.pool


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> List[JobReturn]:
    """Run the batch, at most ``n_jobs`` jobs in flight; its JobReturns, in order."""
    assert launcher.config is not None and launcher.task_function is not None
    assert launcher.hydra_context is not None
    pool = _pool(launcher, len(job_overrides))
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs, up to %d at a time in worker processes, sweep output dir : %s",
             len(job_overrides), pool.size, sweep_dir)
    for i, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
    with COMPOSE_LOCK:  # not while _job_config swaps HydraConfig
        singleton_state = Singleton.get_state()

    todo = collections.deque(enumerate(job_overrides))
    running: Dict[Any, Tuple[int, Slot]] = {}
    results: List[Optional[JobReturn]] = [None] * len(job_overrides)
    with pool.cond:
        pool.launches += 1
    try:
        while todo or running:
            if _exiting(pool):
                raise KeyboardInterrupt("the sweep is exiting: its workers were stopped")
            with pool.cond:
                started = []
                while todo and pool.free:
                    started.append((todo.popleft(), pool.free.pop()))
                pool.publish()  # freed slots count once new jobs took them, not in between
                if not started and not any(f.done() for f in running):
                    pool.cond.wait(timeout=0.5)  # woken by finished jobs and freed slots
                    continue
            for (i, overrides), slot in started:
                future = slot.submit(initial_job_idx + i, overrides, launcher.hydra_context,
                                     launcher.config, launcher.task_function, singleton_state)
                future.add_done_callback(pool.wake)
                running[future] = (i, slot)
            for future in [f for f in running if f.done()]:
                i, slot = running.pop(future)
                results[i] = _job_return(launcher, pool, slot, future, initial_job_idx + i,
                                         job_overrides[i])
                with pool.cond:
                    pool.free.append(slot)
                    pool.cond.notify_all()
    except Exception as e:
        if _exiting(pool):  # e.g. loky refuses new jobs once the interpreter exits
            pool.stop()
            raise KeyboardInterrupt("the sweep is exiting: its workers were stopped") from e
        pool.abandon([slot for _, slot in running.values()])  # this launch only
        raise
    except BaseException:  # Ctrl-C, here or in a worker: every worker stops, no orphans
        pool.stop()
        raise
    finally:
        with pool.cond:
            pool.launches -= 1
            idle = [s.detach() for s in pool.slots if s.executor is not None and s in pool.free] \
                if pool.launches == 0 else []
    for executor in idle:  # let the idle workers exit; the next launch starts new ones
        _shut(executor, wait=True)
    assert all(isinstance(r, JobReturn) for r in results)
    return results  # type: ignore[return-value]


def _job_return(launcher: Any, pool: Pool, slot: Slot, future: Any, idx: int,
                overrides: Sequence[str]) -> JobReturn:
    try:
        return future.result()
    except KeyboardInterrupt:
        raise
    except (ShutdownExecutorError, BrokenProcessPool) as e:
        if pool.stopped or isinstance(e, ShutdownExecutorError):
            raise KeyboardInterrupt("the launcher's workers were stopped") from e
        _shut(slot.detach())  # a broken pool has stopped its worker already
        if isinstance(e, TerminatedWorkerError):
            return dead_job(launcher, idx, overrides, death(slot.workers))
        log.error("#%d: %s", idx, e)  # a task or result that could not be pickled
        return failed_job(launcher, idx, overrides, e)
    except BaseException as e:  # from execute_job but not the task (run_job catches the task's)
        log.error("#%d: the worker raised %r", idx, e)
        return failed_job(launcher, idx, overrides, e)
