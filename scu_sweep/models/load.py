"""Base models through mlx-lm: the random `tiny` Llama, the SmolLM2 GGUF, any mlx-lm path."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..config import ConfigError
from ..records import PICKLE_SUFFIXES
from ..redact import redact_text
from .fast_ops import install_fast_ops
from .gguf import dequantize_fp32
from .safe_load import mlx_lm_load
from .smollm2 import ensure_model_dir
from .tiny import tiny_model_dir


_MODEL_ALLOWED = "allowed an mlx-lm model dir (config.json + model*.safetensors) or a hub repo id 'org/name'"


def check_model_dir(p: Path, key: str) -> None:
    """Refuse a local model dir mlx-lm could not load safely: no safetensors, custom code."""
    where = f"{key}={redact_text(str(p))!r}"
    if not (p / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json; {_MODEL_ALLOWED}")
    if not any(p.glob("model*.safetensors")):  # mlx-lm reads only these, never a pickle
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        found = f"only pickle checkpoints ({', '.join(pickles[:3])}), which are never loaded" if pickles \
            else "no model*.safetensors weights"
        raise ConfigError(f"{where}: {found}; {_MODEL_ALLOWED} (convert the weights to safetensors first)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: config.json is not JSON ({type(e).__name__}); {_MODEL_ALLOWED}") from None
    if isinstance(config, dict) and config.get("model_file"):
        raise ConfigError(f"{where}: config.json asks to run custom code (model_file={config['model_file']!r}), "
                          "which scu_sweep never does; allowed a model of an architecture mlx-lm ships")


def resolve_model_dir(model_cfg) -> str:
    """The mlx-lm model dir (or hub repo) the configured model loads from."""
    if model_cfg.path:
        p = Path(model_cfg.path).expanduser()
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"model.path={redact_text(model_cfg.path)!r}: not a directory; {_MODEL_ALLOWED}")
            check_model_dir(p, "model.path")
            return str(p.resolve())
        if model_cfg.path.count("/") != 1 or model_cfg.path.startswith((".", "/", "~")):
            raise ConfigError(f"model.path={redact_text(model_cfg.path)!r}: no such directory; {_MODEL_ALLOWED}")
        return model_cfg.path
    if model_cfg.source == "tiny":
        return str(tiny_model_dir(model_cfg.tiny, model_cfg.seed))
    if model_cfg.source == "gguf":
        return str(ensure_model_dir(gguf_path=model_cfg.gguf))
    raise ConfigError(f"model.source={model_cfg.source!r}: with model.path=null allowed tiny or gguf")


def keep_quantized(setting: str) -> bool:
    """``auto``: keep quantized weights only where a GPU runs them (CPU quantized matmul is slow)."""
    if setting == "auto":
        return mx.default_device() == mx.gpu
    return setting == "true"


def load(model_cfg):
    """(model, tokenizer, model_ref) with base weights dequantized to fp32 on CPU."""
    ref = resolve_model_dir(model_cfg)
    try:
        model, tokenizer = mlx_lm_load(ref)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        if "trust_remote_code" in str(e):  # transformers' auto_map, mlx-lm's model_file
            first = "it needs its own Python code (trust_remote_code), which scu_sweep never runs"
        raise ConfigError(redact_text(
            f"model.path={ref!r}: could not be loaded by mlx-lm ({type(e).__name__}: {first}); {_MODEL_ALLOWED}")) from e
    if not keep_quantized(model_cfg.quantized):
        dequantize_fp32(model)  # also casts every other float to fp32: CPU fp16/bf16 matmuls get no BLAS
        install_fast_ops(model)  # SwiGLU and attention softmax with the vectorised exp (fast_ops.py)
    return model, tokenizer, ref


def context_length(model, model_cfg):
    """The model's context limit: ``model.max_seq_len`` or its config's max_position_embeddings."""
    if model_cfg.max_seq_len:
        return model_cfg.max_seq_len
    return getattr(model.args, "max_position_embeddings", None)
