"""Tokens/s of the SCU LoRA step in PyTorch + PEFT (the baseline for bench_step.py).

Standalone: run it with an interpreter that has torch, transformers and peft, in
its own process, never one with a preloaded BLAS (``libtorch_cpu.so`` exports
``sgemm_`` and a preload would take over its GEMM). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--train-tokens", type=float, default=1e6)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=2048,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=KEYS)
    model = get_peft_model(LlamaForCausalLM(cfg).float(), lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    lam = torch.tensor(1.0)
    scale = 1.0 / (2 * args.sigma**2 * args.train_tokens)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        loss = ce + lam * scale * sum(p.pow(2).sum() for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "trainable": sum(p.numel() for p in params),
        "step_s": med, "tok_s": args.batch * args.seq / med, "times": times,
    }))


if __name__ == "__main__":
    main()
