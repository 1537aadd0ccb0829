"""``python -m scu_sweep [overrides] [-m]``: Hydra entry point around ``run``."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from scu_sweep.training.backend import preload_blas

preload_blas()  # must precede the first `import mlx.core` (DESIGN §4)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from scu_sweep.cli_check import check_command_line  # noqa: E402
from scu_sweep.config import ConfigError, register  # noqa: E402
from scu_sweep.ranks import launch  # noqa: E402
from scu_sweep.records import FAILURE_FILE, SUMMARY_FILE, StopReason  # noqa: E402
from scu_sweep.redact import redact_text  # noqa: E402
from scu_sweep.sweeps.resume import register_resolver  # noqa: E402
from scu_sweep.validation import validate  # noqa: E402

register()
register_resolver()
log = logging.getLogger("scu_sweep")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _run_ranks(cfg, run_dir: Path, overrides) -> float:
    """``train.ranks`` > 1 (``main`` has validated): train as N processes, read rank 0's summary."""
    from scu_sweep.run import RunFailed, objective  # lazy: MLX and mlx-lm load in the job only

    code = launch(cfg, run_dir, overrides)
    if code != 0:
        failure = run_dir / FAILURE_FILE
        reason = json.loads(failure.read_text()).get("error") if failure.exists() else f"ranks exited with {code}"
        if code == 2:
            raise ConfigError(reason)
        raise RunFailed(f"train.ranks={cfg.train.ranks}: {reason}")
    return objective(json.loads((run_dir / SUMMARY_FILE).read_text()))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg) -> float:
    preload_blas()  # no-op here; in a spawned worker that unpickled `main` it is the first call
    from scu_sweep.run import RunFailed, run, write_failure  # lazy: as in _run_ranks

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)  # ${oc.env:..} stays unexpanded
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        validate(cfg)  # before reading any key: an unresolvable value is a one-line error too
        if cfg.train.ranks > 1:
            return _run_ranks(cfg, run_dir, overrides)
        return run(cfg, run_dir, overrides=overrides)
    except (ConfigError, RunFailed) as e:
        code = 2 if isinstance(e, ConfigError) else 1
        if not (run_dir / FAILURE_FILE).exists():
            write_failure(run_dir, StopReason.BAD_INPUT if code == 2 else StopReason.ERROR, str(e))
        print(f"scu_sweep: error: {redact_text(str(e))}", file=sys.stderr)
        if sweep:  # one failed job never takes the sweep down
            log.error("job %s failed: %s", hc.job.num, redact_text(str(e)))
            return math.nan
        sys.exit(code)
    except Exception as e:  # a bug: the traceback goes to the job log, the sweep goes on
        if not sweep:
            raise
        log.exception("job %s failed", hc.job.num)
        write_failure(run_dir, StopReason.ERROR, f"{type(e).__name__}: {e}")
        return math.nan


if __name__ == "__main__":
    check_command_line(sys.argv[1:], CONF_DIR)
    main()
