"""``python -m scu_sweep.export_peft RUN_DIR OUT``: the entry point; the code is in
``tracking.export_peft``."""

from scu_sweep.tracking.export_peft import main

if __name__ == "__main__":
    raise SystemExit(main())
