"""The `tiny` model: a random small Llama with an offline byte-level tokenizer, built once
into the cache as an mlx-lm model directory (tests, smoke runs, no download)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..config import ConfigError
from ..paths import cache_dir

_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_TINY_FORMAT = 1  # bump when the tiny model files change


def _write_byte_tokenizer(out: Path, max_len: int) -> None:
    """A byte-level tokenizer (256 byte tokens + specials, no merges): offline, lossless."""
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
    from mlx_lm.models import llama  # lazy: mlx_lm imports transformers (~1.5 s), only to build it

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
