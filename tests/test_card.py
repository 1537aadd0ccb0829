"""Model card and parameter_analysis.json, checked against the adapter's tensors."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from scu_sweep.tracking import card

MODULES = {  # module -> (in, out); layer 1's down_proj gets the largest weights
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.0.mlp.down_proj": (32, 16),
    "model.layers.1.self_attn.q_proj": (16, 16),
    "model.layers.1.mlp.down_proj": (32, 16),
}
RANK = 4


def _tensors():
    rng = np.random.default_rng(1)
    t = {}
    for i, (m, (d_in, d_out)) in enumerate(MODULES.items()):
        t[f"{m}.lora_a"] = rng.uniform(-0.25, 0.25, (d_in, RANK)).astype(np.float32)
        b = rng.normal(0, 0.01 * (i + 1), (RANK, d_out))
        b = (b + np.copysign(0.01, b)).astype(np.float32)  # |b| >= 0.01 except the planted
        b[0, :] = 0.0  # planted near-zero entries
        b[1, :3] = 5e-5
        t[f"{m}.lora_b"] = b
    return t


@pytest.fixture
def run(tmp_path):
    adir = tmp_path / "adapters"
    adir.mkdir()
    save_file(_tensors(), str(adir / "adapters.safetensors"))
    (adir / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2, "model": "/cache/models/tiny",
        "lora_parameters": {"rank": RANK, "scale": 2.5, "dropout": 0.0,
                            "keys": ["self_attn.q_proj", "mlp.down_proj"]}}))
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "target_s: 0.03\ntrain:\n  steps: 100\ncontroller:\n  kp: 0.8\n  ki: 0.15\n"
        "  deadband: 0.002\nprior:\n  sigma: 0.1\nsaturation:\n  window: 20\n"
        "data:\n  name: python_docs\n")
    with (tmp_path / "metrics.jsonl").open("w") as f:
        for s in range(1, 41):
            row = {"step": s, "loss": 4.0 - s / 100, "data_bpt": 5.0 - s / 100,
                   "param_bpt": s / 1000, "s_ratio": 0.001 * s, "lambda": 1.0 + s / 10}
            if s % 10 == 0:
                row["val_data_bpt"] = 6.0 - s / 100
            f.write(json.dumps(row) + "\n")
    summary = {"target_s": 0.03, "kp": 0.8, "ki": 0.15, "prior_sigma": 0.1,
               "stop_reason": "saturated", "saturation_step": 40, "adapter_step": 40,
               "steps_run": 40, "train_tokens": 1000, "val_tokens": 100, "tokens_seen": 5120,
               "trainable_params": 1984, "model": "/cache/models/tiny", "data": "python_docs",
               "final": {"loss": 3.6, "data_bpt": 4.6, "param_bpt": 0.04, "s_ratio": 0.04,
                         "lambda": 5.0, "val_data_bpt": 5.6},
               "best": {"val_data_bpt": 5.6, "val_step": 40}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def _expected(ws):
    w = np.concatenate([x.astype(np.float64).ravel() for x in ws])
    return {"count": w.size, "sum_sq": float(w @ w), "l2": float(np.sqrt(w @ w)),
            "std": float(w.std()), "near_zero_frac": float(np.mean(np.abs(w) < 1e-4))}


def test_parameter_analysis_matches_tensors(run):
    card.write_model_card(run, run / "adapters")
    pa = json.loads((run / "adapters" / "parameter_analysis.json").read_text())
    t = _tensors()
    a = [v for k, v in t.items() if k.endswith("lora_a")]
    b = [v for k, v in t.items() if k.endswith("lora_b")]
    for got, want in ((pa["lora_a"], _expected(a)), (pa["lora_b"], _expected(b)),
                      (pa["overall"], _expected(a + b))):
        assert got["count"] == want["count"]
        for k in ("sum_sq", "l2", "std", "near_zero_frac"):
            assert got[k] == pytest.approx(want[k], rel=1e-9), k
    assert pa["lora_b"]["near_zero_frac"] == pytest.approx((4 * (16 + 3)) / (4 * 4 * 16))
    l2 = {m: math.sqrt(_expected([t[f"{m}.lora_a"], t[f"{m}.lora_b"]])["sum_sq"]) for m in MODULES}
    top = [r["module"] for r in pa["top_modules_by_l2"]]
    assert top == sorted(l2, key=lambda m: -l2[m])
    assert pa["top_modules_by_l2"][0]["l2"] == pytest.approx(max(l2.values()), rel=1e-9)
    assert pa["top_modules_by_l2"][0]["count"] == 32 * 4 + 4 * 16
    want_pbpt = _expected(a + b)["sum_sq"] / (2 * 0.1 ** 2 * 1000 * math.log(2))
    assert pa["param_bpt"] == pytest.approx(want_pbpt, rel=1e-9)


def test_card_sections_and_numbers(run):
    readme = card.write_model_card(run, run / "adapters").read_text()
    assert readme.startswith("---\nlibrary_name: mlx\nbase_model: /cache/models/tiny\n")
    for line in ("| rank r | 4 |", "| alpha α | 10 |", "| scale α/r | 2.5 |",
                 "| trainable parameters | 1984 |", "| train tokens N | 1000 |",
                 "| target S* | 0.03 |", "| prior σ | 0.1 |", "| controller.deadband | 0.002 |",
                 "| saturation.window | 20 |", "| best val DataBPT (step 40) | 5.6 |",
                 "| S (fraction) | 0.04 |"):
        assert line in readme, line
    for h in ("## Training dynamics", "## Efficiency analysis", "## Parameter analysis"):
        assert h in readme
    # dynamics: 10 sampled rows including first and last, with the latest validation value
    assert "| 1 | 3.99 | 4.99 | 0.001 | 0.1 | 1.1 | – |" in readme
    assert "| 40 | 3.6 | 4.6 | 0.04 | 4 | 5 | 5.6 |" in readme
    assert "compute saved against the full budget: 60.0 % of the steps (60 steps)" in readme
    assert "| DataBPT | 4.6 | 4.6 |" in readme  # saturation row = last row here
    assert "| `model.layers.1.mlp.down_proj` |" in readme


def test_card_without_saturation(run):
    summary = json.loads((run / "summary.json").read_text())
    summary.update(stop_reason="max_steps", saturation_step=None, steps_run=100)
    readme = card.write_model_card(run, run / "adapters", summary).read_text()
    assert "the saturation point was not reached in this run." in readme
    assert "0.0 % of the steps (0 steps)" in readme
