"""Base models through mlx-lm: the random `tiny` Llama, the SmolLM2 GGUF, any mlx-lm path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError
from .paths import cache_dir
from .records import PICKLE_SUFFIXES
from .redact import redact_text

_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_TINY_FORMAT = 1  # bump when the tiny model files change


def _write_byte_tokenizer(out: Path, max_len: int) -> None:
    """A byte-level tokenizer (256 byte tokens + specials, no merges): offline, lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_TINY_SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "model_max_length": max_len,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def tiny_model_dir(tiny_cfg, seed: int) -> Path:
    """Build (once) an mlx-lm model dir holding a random small Llama; cached by config hash."""
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": tiny_cfg.hidden_size,
        "intermediate_size": tiny_cfg.intermediate_size,
        "num_hidden_layers": tiny_cfg.num_hidden_layers,
        "num_attention_heads": tiny_cfg.num_attention_heads,
        "num_key_value_heads": tiny_cfg.num_key_value_heads,
        "vocab_size": tiny_cfg.vocab_size,
        "max_position_embeddings": tiny_cfg.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    if config["vocab_size"] < 256 + len(_TINY_SPECIALS):
        raise ConfigError(f"model.tiny.vocab_size={config['vocab_size']}: allowed an int >= {256 + len(_TINY_SPECIALS)}")
    key = hashlib.sha256(json.dumps([config, seed, _TINY_FORMAT], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"tiny-{key}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    _write_byte_tokenizer(tmp, config["max_position_embeddings"])
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
        from .smollm2 import ensure_model_dir

        return str(ensure_model_dir(gguf_path=model_cfg.gguf))
    raise ConfigError(f"model.source={model_cfg.source!r}: with model.path=null allowed tiny or gguf")


def mlx_lm_load(ref, **kwargs):
    """``mlx_lm.load`` with custom code off for the model and its tokenizer.

    mlx-lm reads only ``model*.safetensors`` (never pickle checkpoints); ``trust_remote_code``
    is passed as False both to mlx-lm (a config's ``model_file``) and, through
    ``tokenizer_config``, to transformers' ``AutoTokenizer`` (an ``auto_map`` entry), so a
    model directory or hub repo can never make this process import its Python files.
    """
    from mlx_lm import load as mlx_load

    tokenizer_config = dict(kwargs.pop("tokenizer_config", None) or {})
    if kwargs.pop("trust_remote_code", False) or tokenizer_config.get("trust_remote_code"):
        raise ValueError("trust_remote_code: allowed only False (scu_sweep never runs a model's own code)")
    tokenizer_config["trust_remote_code"] = False
    return mlx_load(str(ref), tokenizer_config=tokenizer_config, trust_remote_code=False, **kwargs)


def keep_quantized(setting: str) -> bool:
    """``auto``: keep quantized weights only where a GPU runs them (CPU quantized matmul is slow)."""
    if setting == "auto":
        return mx.default_device() == mx.gpu
    return setting == "true"


def load(model_cfg):
    """(model, tokenizer, model_ref) with base weights dequantized to fp32 on CPU."""
    from .gguf import dequantize_fp32

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
        from .losses import install_fast_ops

        dequantize_fp32(model)
        model.set_dtype(mx.float32)  # CPU: fp16/bf16 matmuls get no BLAS
        install_fast_ops(model)  # SwiGLU and attention softmax with the vectorised exp (losses.py)
    return model, tokenizer, ref


def context_length(model, model_cfg):
    """The model's context limit: ``model.max_seq_len`` or its config's max_position_embeddings."""
    if model_cfg.max_seq_len:
        return model_cfg.max_seq_len
    return getattr(model.args, "max_position_embeddings", None)
