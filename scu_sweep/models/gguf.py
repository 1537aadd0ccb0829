"""Convert a llama-architecture GGUF into an mlx-lm model directory.

MLX reads GGUF itself (``mx.load(path, return_metadata=True)``): Q4_0/Q4_1/Q8_0
tensors arrive as MLX affine-quantised triples (``weight`` uint32, ``scales``,
``biases``; group size 32), so they become ``QuantizedLinear`` /
``QuantizedEmbedding`` weights unchanged. The q/k projections are stored in
GGUF's interleaved-RoPE row order; their rows are put back into the Hugging Face
order so that the directory is a plain mlx-lm Llama (``rope_traditional=False``)
whose LoRA adapters also fit the original Hugging Face checkpoint.
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ..config import ConfigError
from .safe_load import mlx_lm_load

GROUP_SIZE = 32  # block size of GGUF's Q4_0, Q4_1 and Q8_0
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are added tokens
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(ConfigError):
    """A GGUF file that cannot be used; the message is one line naming ``model.gguf``."""

    def __init__(self, path, reason: str):
        reason = " ".join(str(reason).split())
        super().__init__(
            f"model.gguf={str(path)!r}: not usable ({reason}); "
            "allowed: a complete llama-architecture GGUF file such as SmolLM2-135M-Instruct.Q4_1.gguf"
        )


def read_gguf(path) -> tuple[dict, dict]:
    """Return ``(arrays, metadata)`` of a llama GGUF, or raise `GGUFError`.

    MLX's own GGUF parser reads it (tensors and metadata only, nothing is executed); MLX
    picks the parser by suffix, so only ``*.gguf`` is accepted.
    """
    if Path(path).suffix.lower() != ".gguf":
        raise GGUFError(path, "not a .gguf file")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as err:
        raise GGUFError(path, err) from None
    if _scalar(meta.get("general.architecture", "")) != "llama":
        raise GGUFError(path, f"architecture {meta.get('general.architecture')!r} is not 'llama'")
    if "tokenizer.ggml.tokens" not in meta or "token_embd.weight" not in arrays:
        raise GGUFError(path, "no tokenizer vocabulary or token embedding in the file")
    return arrays, meta


def _scalar(value):
    """A metadata value as a Python scalar (MLX gives numbers as 0-d arrays)."""
    return value.item() if isinstance(value, mx.array) else value


def model_config(meta: dict, arrays: dict) -> dict:
    """The mlx-lm / Hugging Face ``config.json`` of the GGUF's llama model."""
    get = lambda key: _scalar(meta[f"llama.{key}"])  # noqa: E731
    heads = get("attention.head_count")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(meta.get("llama.attention.head_count_kv", heads)),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(_scalar(meta.get("llama.rope.freq_base", 10000.0))),
        "rope_traditional": False,
        "max_position_embeddings": get("context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in arrays,
        "bos_token_id": _scalar(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": _scalar(meta.get("tokenizer.ggml.eos_token_id", 2)),
    }
    if any(name.endswith(".scales") for name in arrays):  # quantised: each module's bits
        config["quantization"] = quantization_config(arrays)
        config["quantization_config"] = config["quantization"]
    return config


def mlx_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.scales``) to mlx-lm's name."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", gguf_name)
    if match:
        layer, part, leaf = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}"
    part, leaf = gguf_name.rsplit(".", 1)
    return f"{_TOP_NAMES[part]}.{leaf}"


def quantized_bits(weight: mx.array, scales: mx.array) -> int:
    """Bits per weight of an MLX affine triple with group size 32, from shapes."""
    in_features = scales.shape[-1] * GROUP_SIZE
    return weight.shape[-1] * 32 // in_features


def quantization_config(arrays: dict) -> dict:
    """mlx-lm's ``quantization`` entry: a 4-bit default plus per-module exceptions."""
    config = {"group_size": GROUP_SIZE, "bits": 4, "mode": "affine"}
    for name, scales in arrays.items():
        if name.endswith(".scales"):
            prefix = name[: -len(".scales")]
            bits = quantized_bits(arrays[f"{prefix}.weight"], scales)
            if bits != config["bits"]:
                module = mlx_name(f"{prefix}.weight").rsplit(".", 1)[0]
                config[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return config


def unpermute_rope_rows(rows: mx.array, n_heads: int) -> mx.array:
    """GGUF's interleaved-RoPE row order of a q/k projection -> Hugging Face order.

    Within a head GGUF row ``2*j + t`` holds Hugging Face row ``t*head_dim/2 + j``.
    Works on any array whose first axis is the output rows (packed weights,
    scales, biases or float weights alike).
    """
    head_dim = rows.shape[0] // n_heads
    split = rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:])
    return split.swapaxes(1, 2).reshape(rows.shape)


def convert_weights(arrays: dict, config: dict) -> dict:
    """GGUF tensors -> mlx-lm Llama weights (names mapped, q/k rows unpermuted)."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for name, array in arrays.items():
        part = name.split(".")[-2]
        if part in heads:
            array = unpermute_rope_rows(array, heads[part])
        weights[mlx_name(name)] = array
    return weights


def build_tokenizer(meta: dict) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary."""
    if _scalar(meta.get("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE ('gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    types = types.tolist() if isinstance(types, mx.array) else list(types)
    tok.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tok


def tokenizer_config(meta: dict) -> dict:
    """``tokenizer_config.json``: special tokens and the GGUF's chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    token = lambda key, default: tokens[_scalar(meta.get(f"tokenizer.ggml.{key}_token_id", default))]  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos", 1),
        "eos_token": token("eos", 2),
        "pad_token": token("padding", 2),
        "unk_token": token("unknown", 0),
        "add_bos_token": bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _scalar(meta["llama.context_length"]),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def convert(gguf_path, out_dir) -> Path:
    """Write an mlx-lm model directory (config, safetensors, tokenizer) for a GGUF."""
    arrays, meta = read_gguf(gguf_path)
    try:
        config = model_config(meta, arrays)
        weights = convert_weights(arrays, config)
        tokenizer = build_tokenizer(meta)
    except (KeyError, ValueError) as err:
        raise GGUFError(gguf_path, f"unsupported content ({type(err).__name__}: {err})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2))
    return out


def dequantize_fp32(model: nn.Module) -> nn.Module:
    """Replace quantised layers by fp32 ones (in place); the fast path on CPU.

    Affine scales and biases are widened to fp32 before ``scale * q + bias``, as
    llama.cpp computes it, so no fp16 rounding is added (``mlx_lm``'s
    ``dequantize_model`` works in the scales' fp16). Other float parameters
    (norms) are cast to fp32 too.
    """
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    dense = [(name, _dense(m)) for name, m in model.named_modules() if isinstance(m, quantized)]
    model.update_modules(tree_unflatten(dense))
    model.set_dtype(mx.float32)
    return model


def _dense(module: nn.Module) -> nn.Module:
    """The fp32 ``Linear``/``Embedding`` equal to one quantised layer."""
    affine = module.mode == "affine"
    scales = module.scales.astype(mx.float32) if affine else module.scales
    biases = module.biases.astype(mx.float32) if affine else None
    weight = mx.dequantize(module.weight, scales, biases, module.group_size, module.bits, mode=module.mode)
    weight = weight.astype(mx.float32)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    return layer


def load(model_dir, dequantize: bool = True, **mlx_lm_kwargs):
    """``mlx_lm.load`` a converted directory (``adapter_path=`` etc. pass through; custom
    code stays off, see `scu_sweep.models.safe_load`); fp32 via `dequantize_fp32` unless
    ``dequantize=False`` (keep 4-bit for Metal/CUDA)."""
    model, tokenizer = mlx_lm_load(str(model_dir), **mlx_lm_kwargs)
    if dequantize:
        dequantize_fp32(model)
        mx.eval(model.parameters())
    return model, tokenizer
