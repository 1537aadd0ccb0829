"""LoRA through mlx-lm's layers; Σw² over the adapter; adapters in mlx-lm's format."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..config import ConfigError
from ..records import atomic_replace, atomic_write_text


def _block_linear_names(model) -> list:
    names = set()
    for block in model.layers:
        for name, mod in block.named_modules():
            if isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
                names.add(name)
    return sorted(names)


def lora_parameters(lora_cfg) -> dict:
    """mlx-lm's ``lora_parameters`` (scale = alpha / rank, as in PEFT)."""
    return {
        "rank": int(lora_cfg.rank),
        "scale": float(lora_cfg.alpha) / int(lora_cfg.rank),
        "dropout": float(lora_cfg.dropout),
        "keys": list(lora_cfg["keys"]) or None,
    }


def apply_lora(model, lora_cfg) -> dict:
    """Freeze the base, wrap the chosen linears in LoRA; return adapter_config.json fields."""
    available = _block_linear_names(model)
    keys = list(lora_cfg["keys"])  # DictConfig.keys is a method: index instead
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise ConfigError(f"lora.keys={keys}: {unknown} match no module; allowed: {available}")
    n_layers = len(model.layers) if lora_cfg.num_layers < 0 else min(int(lora_cfg.num_layers), len(model.layers))
    params = lora_parameters(lora_cfg)
    model.freeze()
    linear_to_lora_layers(model, n_layers, params)
    if params["keys"] is None:
        params["keys"] = available
    return {"fine_tune_type": "lora", "num_layers": n_layers, "lora_parameters": params}


def trainable_leaves(model) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def count_trainable(model) -> int:
    return sum(v.size for v in trainable_leaves(model).values())


def sum_sq(params) -> mx.array:
    """Σw² over every leaf of a parameter tree (fp32 accumulation)."""
    leaves = [v for _, v in tree_flatten(params)]
    return sum(mx.sum(mx.square(v.astype(mx.float32))) for v in leaves)


def save_adapter(model, out_dir: Path, adapter_config: dict, base_model: str) -> Path:
    """Write adapters.safetensors + adapter_config.json that ``mlx_lm.load(..., adapter_path=)`` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    leaves = trainable_leaves(model)
    atomic_replace(out_dir / "adapters.safetensors",
                   lambda tmp: mx.save_safetensors(str(tmp), leaves, metadata={"format": "mlx"}))
    cfg = dict(adapter_config, model=base_model)
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(cfg, indent=2))
    return out_dir
