"""Base models and adapters: GGUF reading, the SmolLM2 cache, the tiny model, mlx-lm loading
with custom code off, the fast CPU ops installed into a loaded model, LoRA.

Imports nothing itself, so ``import scu_sweep.models.x`` loads only ``x`` and what it needs."""
