"""``python -m scu_sweep.report SWEEP_DIR``: the entry point; the code is in ``tracking.report``."""

from scu_sweep.tracking.report import main

if __name__ == "__main__":
    raise SystemExit(main())
