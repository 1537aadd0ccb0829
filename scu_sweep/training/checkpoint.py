"""Resumable checkpoints: adapter, AdamW state and the loop's own state, written atomically.

Layout inside a run dir::

    checkpoints/step-000040/arrays.safetensors   adapter weights ("adapter.*"), optimizer state ("optimizer.*"),
                                                 the adapter the run keeps so far ("kept.*", saturation.keep)
    checkpoints/step-000040/state.json           step, controller, saturation detector, best, last row, ...
    checkpoints/latest.json                      {"step": 40, "dir": "step-000040"}: the commit point

A checkpoint directory is complete (files fsynced) before ``latest.json`` is atomically
replaced to name it, and older directories are removed only after that, so a kill at any
moment leaves ``latest.json`` naming a whole checkpoint. Dropout's RNG is re-seeded from
(train.seed, step) every step and the batch order is a function of the step, so the step
number is the whole RNG and data position.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..records import atomic_write_json, fsync_path

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


@dataclass
class Checkpoint:
    step: int
    arrays: dict  # flat name -> mx.array
    state: dict  # JSON state of the loop


def save(run_dir: Path, step: int, model, optimizer, state: dict, kept: Optional[dict] = None) -> Path:
    """Write checkpoint ``step`` and make it the latest; returns its directory.

    ``kept``: the adapter arrays the run would keep if it ended now (saturation.keep)."""
    root = Path(run_dir) / CKPT_DIR
    d = root / f"step-{step:06d}"
    if d.exists():  # a half-written leftover of a killed save
        shutil.rmtree(d)
    d.mkdir(parents=True)
    arrays = {f"adapter.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    arrays.update({f"kept.{k}": v for k, v in (kept or {}).items()})
    mx.save_safetensors(str(d / "arrays.safetensors"), arrays)
    fsync_path(d / "arrays.safetensors")
    atomic_write_json(d / "state.json", dict(state, step=step))
    fsync_path(d)
    atomic_write_json(root / LATEST, {"step": step, "dir": d.name})  # the commit point
    for old in root.glob("step-*"):
        if old != d and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return d


def latest(run_dir: Path) -> Optional[Checkpoint]:
    """The committed checkpoint of ``run_dir``, or None."""
    root = Path(run_dir) / CKPT_DIR
    try:
        pointer = json.loads((root / LATEST).read_text())
        d = root / pointer["dir"]
        state = json.loads((d / "state.json").read_text())
        arrays = mx.load(str(d / "arrays.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return Checkpoint(step=int(pointer["step"]), arrays=arrays, state=state)


def restore(ckpt: Checkpoint, model, optimizer) -> None:
    """Load the adapter into ``model`` and the AdamW state into ``optimizer``, in place.

    In place matters: the compiled step holds ``optimizer.state`` as a compile input.
    """
    model.load_weights(list(arrays_under(ckpt, "adapter").items()), strict=False)
    optimizer.init(model.trainable_parameters())
    for path, value in arrays_under(ckpt, "optimizer").items():
        _set_leaf(optimizer.state, path.split("."), value)
    mx.eval(model.parameters(), optimizer.state)


def arrays_under(ckpt: Checkpoint, prefix: str) -> dict:
    """The checkpoint's arrays saved under ``prefix`` (adapter, optimizer, kept), names without it."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in ckpt.arrays.items() if k.startswith(prefix + ".")}


def _set_leaf(tree, keys: list, value) -> None:
    for k in keys[:-1]:
        tree = tree[int(k)] if isinstance(tree, list) else tree[k]
    tree[int(keys[-1]) if isinstance(tree, list) else keys[-1]] = value


def remove(run_dir: Path) -> None:
    """Drop the checkpoints once the run's result is written (they are only for resuming)."""
    shutil.rmtree(Path(run_dir) / CKPT_DIR, ignore_errors=True)
