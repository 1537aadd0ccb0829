"""Export an mlx-lm LoRA adapter as a Hugging Face PEFT adapter.

mlx-lm computes y = W x + s · (x A) B with A = lora_a (in, r), B = lora_b (r, out) and
s = scale. PEFT computes y = W x + (α / r) · B' A' x with A' = lora_A.weight (r, in) and
B' = lora_B.weight (out, r). So A' = Aᵀ, B' = Bᵀ and lora_alpha = s · r.

    python -m scu_sweep.export_peft RUN_DIR OUT [--base HF_REPO_OR_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .run_files import run_config

# Base models whose mlx-lm copy comes from a GGUF; PEFT users load the original repo.
HF_BASES = {"smollm2_135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PREFIX = "base_model.model."


class ExportError(ValueError):
    """The adapter cannot be expressed as a PEFT LoRA adapter; one-line message."""


def _adapter_dir(path: Path) -> Path:
    path = Path(path)
    for d in (path / "adapters", path):
        if (d / "adapters.safetensors").is_file() and (d / "adapter_config.json").is_file():
            return d
    raise ExportError(f"RUN_DIR={path}: no adapters/adapters.safetensors + adapter_config.json")


def convert(tensors: dict, adapter_config: dict) -> tuple[dict, dict]:
    """mlx-lm adapter tensors + config -> (PEFT state dict, PEFT config fields)."""
    import numpy as np  # lazy: keeps the CLI's --help and argument errors cheap

    if adapter_config.get("fine_tune_type", "lora") != "lora":
        raise ExportError(f"fine_tune_type={adapter_config.get('fine_tune_type')!r}: "
                          "allowed 'lora' (PEFT export of DoRA/full is not supported)")
    lp = adapter_config["lora_parameters"]
    rank, scale = int(lp["rank"]), float(lp["scale"])
    out, pairs, bad = {}, {"lora_a": set(), "lora_b": set()}, []
    for name, w in sorted(tensors.items()):
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b") or w.ndim != 2:
            bad.append(f"{name} {tuple(w.shape)}")
            continue
        if (w.shape[1] if leaf == "lora_a" else w.shape[0]) != rank:
            bad.append(f"{name} {tuple(w.shape)} (rank {rank})")
            continue
        peft_leaf = "lora_A" if leaf == "lora_a" else "lora_B"
        out[f"{PREFIX}{module}.{peft_leaf}.weight"] = np.ascontiguousarray(w.T)
        pairs[leaf].add(module)
    if bad:
        raise ExportError("tensors that are not mlx-lm LoRA pairs: " + ", ".join(bad))
    unpaired = sorted(pairs["lora_a"] ^ pairs["lora_b"])
    if unpaired:
        raise ExportError(f"modules without both lora_a and lora_b: {', '.join(unpaired)}")
    modules = pairs["lora_a"]
    alpha = scale * rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(lp.get("dropout", 0.0)), "target_modules": sorted(modules),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }
    return out, config


def _base_model(run_dir: Path, adapter_config: dict, base: str | None) -> str:
    if base:
        return base
    name = (run_config(run_dir).get("model") or {}).get("name")
    return HF_BASES.get(name) or adapter_config.get("model") or ""


def export_peft(run_dir: Path, out_dir: Path, base: str | None = None) -> Path:
    """Write out_dir/adapter_model.safetensors + adapter_config.json; return out_dir."""
    from safetensors.numpy import load_file, save_file  # lazy, as numpy above

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adir = _adapter_dir(run_dir)
    acfg = json.loads((adir / "adapter_config.json").read_text())
    base_cfg = Path(str(acfg.get("model", ""))) / "config.json"
    if base_cfg.is_file() and json.loads(base_cfg.read_text()).get("rope_traditional"):
        raise ExportError(f"{base_cfg}: rope_traditional=true; Hugging Face Llama uses the "
                          "rotate-half RoPE layout, so q/k LoRA rows would not match")
    tensors, config = convert(load_file(str(adir / "adapters.safetensors")), acfg)
    config["base_model_name_or_path"] = _base_model(run_dir, acfg, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scu_sweep.export_peft",
                                 description="Export a run's mlx-lm LoRA adapter for PEFT.")
    ap.add_argument("run_dir", type=Path, help="run dir (or its adapters/ dir)")
    ap.add_argument("out", type=Path, help="output dir for the PEFT adapter")
    ap.add_argument("--base", help="base_model_name_or_path to record (HF repo or dir)")
    args = ap.parse_args(argv)
    try:
        out = export_peft(args.run_dir, args.out, args.base)
    except ExportError as e:
        print(f"export_peft: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
