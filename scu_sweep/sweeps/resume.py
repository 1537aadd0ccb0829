"""``train.resume=auto``: the same command continues an interrupted run or sweep.

Two halves:
- choosing the directory. ``hydra.run.dir`` / ``hydra.sweep.dir`` go through the
  ``scu_resume_dir`` resolver: it returns the newest earlier directory of the same
  command (same overrides) that did not finish and whose process is gone, else a new
  timestamped one. A live run or sweep holds an ``fcntl`` lock on ``.scu.lock`` in its
  directory, so two concurrent commands never share one.
- inside a run dir (``run.py``): a finished job (``summary.json`` of the same config)
  is not run again; a checkpoint of the same config is continued; anything else starts
  afresh and drops the stale files.

Stdlib, OmegaConf and the config schema (``plain_config``) only, apart from ``checkpoint`` (MLX),
imported where a checkpoint is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ..config import plain_config
from ..records import FAILURE_FILE, METRICS_FILE, SUMMARY_FILE, atomic_write_text, read_json, read_jsonl

log = logging.getLogger(__name__)

LOCK_FILE = ".scu.lock"
RESOLVER = "scu_resume_dir"
SWEEP_DONE = "sweep_summary.csv"  # written by the sweep's end callback
_IGNORED = ("logger", "pruning")  # keys that do not change what a run computes
_IGNORED_TRAIN = ("resume", "checkpoint_every")


def fingerprint(cfg: Any) -> str:
    """sha256 of everything that decides a run's numbers (not logging, pruning links, resume keys)."""
    c = {k: v for k, v in plain_config(cfg).items() if k not in _IGNORED and k != "hydra"}
    c["train"] = {k: v for k, v in c.get("train", {}).items() if k not in _IGNORED_TRAIN}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_summary(cfg: Any, run_dir: Path, fp: str) -> Optional[dict]:
    """The summary of an earlier finished run of this config in ``run_dir`` (resume=auto), else None."""
    if cfg.train.resume != "auto":
        return None
    summary = read_json(Path(run_dir) / SUMMARY_FILE)
    return summary if summary and summary.get("config_hash") == fp else None


def checkpoint_to_resume(cfg: Any, run_dir: Path, fp: str):
    """The latest checkpoint in ``run_dir`` written by this config (resume=auto), else None."""
    if cfg.train.resume != "auto":
        return None
    from ..training import checkpoint  # lazy: MLX; Hydra resolves the run dir through this module

    ckpt = checkpoint.latest(run_dir)
    if ckpt is not None and ckpt.state.get("config_hash") != fp:
        log.warning("%s: its checkpoint is of another configuration; starting afresh", run_dir)
        return None
    return ckpt


def prepare_run_dir(run_dir: Path, ckpt) -> None:
    """Drop what an earlier attempt left that the new one will rewrite.

    metrics.jsonl keeps the rows up to the checkpoint's step (a torn last line goes too);
    a stale summary.json / failure.json is removed: their presence must describe this run.
    """
    run_dir = Path(run_dir)
    for name in (SUMMARY_FILE, FAILURE_FILE):
        (run_dir / name).unlink(missing_ok=True)
    metrics = run_dir / METRICS_FILE
    if metrics.exists():
        keep = [r for r in read_jsonl(metrics) if ckpt is not None and r.get("step", 0) <= ckpt.step]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in keep))
    if ckpt is None:
        from ..training import checkpoint  # lazy: MLX; Hydra resolves the run dir through this module

        checkpoint.remove(run_dir)


_HELD: set = set()  # directories this process has locked


class DirLock:
    """An exclusive ``fcntl`` lock on ``<dir>/.scu.lock`` while this process lives (or until release).

    Raises OSError when another live process holds it.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd: Optional[int] = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise
        _HELD.add(self.dir)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
            _HELD.discard(self.dir)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc``), else ``""``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in () may hold spaces


def process_token(pid: Optional[int] = None) -> str:
    """``host:pid:start`` naming one process; the start time tells a reused pid apart."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def token_alive(token: str) -> Optional[bool]:
    """Whether the process named by :func:`process_token` still runs; None on another host."""
    host, pid, start = token.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return _start_time(int(pid)) == start


def _locked(directory: Path) -> bool:
    """True while another live process holds ``directory``'s lock."""
    if Path(directory).resolve() in _HELD:
        return False
    try:
        DirLock(directory).release()
        return False
    except OSError:
        return True


def _overrides_of(directory: Path, kind: str) -> Optional[list]:
    """The task overrides an earlier run (``.hydra/overrides.yaml``) or sweep (``multirun.yaml``) was given."""
    import yaml  # lazy: only when earlier dirs are looked at

    try:
        if kind == "sweep":
            doc = yaml.safe_load((directory / "multirun.yaml").read_text())
            return list(doc["hydra"]["overrides"]["task"])
        return list(yaml.safe_load((directory / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _unfinished(directory: Path, kind: str) -> bool:
    if kind == "sweep":
        return not (directory / SWEEP_DONE).exists()
    return not (directory / SUMMARY_FILE).exists() and not (directory / FAILURE_FILE).exists()


def resume_dir(kind: str, root: str, fresh: str, overrides: list, resume: str) -> str:
    """``root/fresh``, or the newest unfinished, unlocked ``root/DATE/TIME`` of the same overrides."""
    fresh_dir = str(Path(root) / fresh)
    if resume != "auto":
        return fresh_dir
    want = sorted(str(o) for o in overrides)
    candidates = [d for d in Path(root).glob("*/*") if d.is_dir()] if Path(root).is_dir() else []
    for d in sorted(candidates, reverse=True):  # DATE/TIME names: newest first
        seen = _overrides_of(d, kind)
        if seen is not None and sorted(seen) == want and _unfinished(d, kind) and not _locked(d):
            log.info("resuming the interrupted %s in %s (train.resume=never starts afresh)", kind, d)
            return str(d)
    return fresh_dir


def command_overrides(argv: list) -> tuple:
    """(task overrides, train.resume) of a ``python -m scu_sweep ARGV`` command line."""
    from hydra._internal.utils import get_args_parser  # lazy: only when the resolver runs
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    task = [o.input_line for o in parsed if not o.is_hydra_override()]
    resume = next((str(o.value()) for o in parsed if o.key_or_group == "train.resume"), "auto")
    return task, resume


def _resolver(kind: str, root: str, fresh: str) -> str:
    """OmegaConf resolver behind ``${scu_resume_dir:run|sweep,ROOT,FRESH}``.

    It reads the command from ``sys.argv``, not from ``hydra.overrides.task``: a sweep's
    jobs hold their own overrides, and must get the parent's answer from the resolver cache.
    """
    overrides, resume = command_overrides(sys.argv[1:])
    return resume_dir(kind, root, fresh, overrides, resume)


def register_resolver() -> None:
    """Cached: a sweep's jobs (and spawned workers) reuse the parent's resolved value."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolver, use_cache=True)
