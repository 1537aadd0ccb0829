"""Die with the parent process.

A SIGKILL runs no cleanup: a sweep process killed that way would leave its workers (and
a run its ``train.ranks`` processes) training on as orphans, holding their run dirs and
the cores. Each child watches its parent instead and kills itself once the parent is
gone; its run continues from its last checkpoint when the command is run again.
Stdlib only; works where ``prctl(PR_SET_PDEATHSIG)`` does not (macOS, and children
spawned from a thread that may exit first).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

PARENT_ENV = "SCU_SWEEP_PARENT_PID"  # set for children started by a plain Popen


def die_with_parent(parent: Optional[int] = None, interval: float = 0.5) -> None:
    """Start a daemon thread that SIGKILLs this process when ``parent`` (default: the
    current parent) is no longer its parent."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="scu-lifeline", daemon=True).start()


def die_with_env_parent() -> None:
    """:func:`die_with_parent` for the pid in ``SCU_SWEEP_PARENT_PID``, when set."""
    pid = os.environ.get(PARENT_ENV)
    if pid:
        die_with_parent(int(pid))
