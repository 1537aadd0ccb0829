"""PEFT export: names, shapes, A/B layout and scaling against mlx-lm's LoRALinear."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from scu_sweep.tracking import export_peft as ep

RANK, SCALE = 4, 2.5  # alpha = 10
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (40, 24),
          "model.layers.1.self_attn.q_proj": (24, 16)}  # module -> (in, out)


def _adapter(run_dir, tensors=None, **cfg):
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = {}
        for m, (d_in, d_out) in SHAPES.items():
            tensors[f"{m}.lora_a"] = rng.normal(size=(d_in, RANK)).astype(np.float32)
            tensors[f"{m}.lora_b"] = rng.normal(size=(RANK, d_out)).astype(np.float32)
    adir = run_dir / "adapters"
    adir.mkdir(parents=True)
    save_file(tensors, str(adir / "adapters.safetensors"))
    acfg = {"fine_tune_type": "lora", "num_layers": 2, "model": "some/base",
            "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.05,
                                "keys": ["self_attn.q_proj", "mlp.down_proj"]}}
    acfg.update(cfg)
    (adir / "adapter_config.json").write_text(json.dumps(acfg))
    return tensors


def test_names_shapes_layout_config(tmp_path):
    src = _adapter(tmp_path / "run")
    out = ep.export_peft(tmp_path / "run", tmp_path / "peft")
    got = load_file(str(out / "adapter_model.safetensors"))
    assert len(got) == 2 * len(SHAPES)
    for m, (d_in, d_out) in SHAPES.items():
        a = got[f"base_model.model.{m}.lora_A.weight"]
        b = got[f"base_model.model.{m}.lora_B.weight"]
        assert a.shape == (RANK, d_in) and b.shape == (d_out, RANK)
        np.testing.assert_array_equal(a, src[f"{m}.lora_a"].T)
        np.testing.assert_array_equal(b, src[f"{m}.lora_b"].T)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == RANK and cfg["lora_alpha"] == 10 and cfg["lora_dropout"] == 0.05
    assert cfg["target_modules"] == sorted(SHAPES)
    assert cfg["base_model_name_or_path"] == "some/base"
    assert ep.export_peft(tmp_path / "run", tmp_path / "p2", base="org/hf")  # --base wins
    assert json.loads((tmp_path / "p2" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "org/hf"


def test_peft_formula_matches_mlx_lora_linear(tmp_path):
    """PEFT's y = W x + (α/r)·B'(A'x) from the export equals mlx-lm's LoRALinear output."""
    mx = pytest.importorskip("mlx.core")
    from mlx import nn
    from mlx_lm.tuner.lora import LoRALinear

    src = _adapter(tmp_path / "run")
    out = ep.export_peft(tmp_path / "run", tmp_path / "peft")
    got = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    m = "model.layers.0.mlp.down_proj"
    d_in, d_out = SHAPES[m]
    lin = LoRALinear.from_base(nn.Linear(d_in, d_out, bias=False), r=RANK, scale=SCALE)
    lin.lora_a, lin.lora_b = mx.array(src[f"{m}.lora_a"]), mx.array(src[f"{m}.lora_b"])
    x = np.random.default_rng(2).normal(size=(3, d_in)).astype(np.float32)
    y_mlx = np.array(lin(mx.array(x)))
    w = np.array(lin.linear.weight)
    a, b = got[f"base_model.model.{m}.lora_A.weight"], got[f"base_model.model.{m}.lora_B.weight"]
    y_peft = x @ w.T + (cfg["lora_alpha"] / cfg["r"]) * ((x @ a.T) @ b.T)
    np.testing.assert_allclose(y_peft, y_mlx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, msg", [
    ({"fine_tune_type": "dora"}, "fine_tune_type='dora'"),
])
def test_refuses_non_lora(tmp_path, change, msg):
    _adapter(tmp_path / "run", **change)
    with pytest.raises(ep.ExportError, match=msg):
        ep.export_peft(tmp_path / "run", tmp_path / "peft")


def test_refuses_unpaired_and_wrong_rank(tmp_path):
    t = {"model.layers.0.q_proj.lora_a": np.zeros((8, RANK), np.float32),
         "model.layers.0.k_proj.lora_b": np.zeros((RANK, 8), np.float32)}
    _adapter(tmp_path / "a", t)
    with pytest.raises(ep.ExportError, match="model.layers.0.k_proj, model.layers.0.q_proj"):
        ep.export_peft(tmp_path / "a", tmp_path / "pa")
    t = {"model.layers.0.q_proj.lora_a": np.zeros((8, 3), np.float32),
         "model.layers.0.q_proj.lora_b": np.zeros((3, 8), np.float32)}
    _adapter(tmp_path / "b", t)
    with pytest.raises(ep.ExportError, match=r"lora_a \(8, 3\) \(rank 4\)"):
        ep.export_peft(tmp_path / "b", tmp_path / "pb")


def test_cli(tmp_path):
    _adapter(tmp_path / "run")
    cmd = [sys.executable, "-m", "scu_sweep.export_peft"]
    r = subprocess.run(cmd + [str(tmp_path / "run"), str(tmp_path / "out")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json"}
    r = subprocess.run(cmd + [str(tmp_path / "nothing"), str(tmp_path / "o2")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "no adapters/adapters.safetensors" in r.stderr


@pytest.mark.slow
def test_peft_round_trip_matches_mlx(tmp_path):
    """Load the export onto a tiny HF Llama with PEFT; logits match mlx-lm's with the adapter."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from peft import PeftModel

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    base_dir = tmp_path / "base"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(base_dir, safe_serialization=True)

    model, _ = load_model(base_dir)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": keys})
    rng = np.random.default_rng(3)
    params = {k: mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32))
              for k, v in tree_flatten(model.trainable_parameters())}
    model.load_weights(list(params.items()), strict=False)
    (tmp_path / "run" / "adapters").mkdir(parents=True)
    mx.save_safetensors(str(tmp_path / "run/adapters/adapters.safetensors"), params)
    (tmp_path / "run/adapters/adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2, "model": str(base_dir),
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": keys}}))
    ids = np.array([[1, 5, 9, 17, 33, 2, 60]])
    y_mlx = np.array(model(mx.array(ids)).astype(mx.float32))

    out = ep.export_peft(tmp_path / "run", tmp_path / "peft")
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        y_pt = peft_model(torch.tensor(ids)).logits.numpy()
        with peft_model.disable_adapter():
            y_base = peft_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(y_pt, y_mlx, rtol=1e-4, atol=1e-4)
    assert not np.allclose(y_base, y_mlx, atol=1e-2)  # the adapter changes the logits
