"""Range and consistency checks of a composed config (the schema only checks types).

``validate`` raises one ``ConfigError`` line naming every invalid key and what is
allowed; the Hydra app calls it before anything is loaded or written.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Union, get_args, get_origin, get_type_hints

from .config import ConfigError, SCUConfig
from .scu.controller import ERRORS, LAWS, SMOOTHS
from .scu.saturation import KEEP_RULES

_CHOICES = {
    "model.source": ("tiny", "gguf", "mlx_lm"),
    "model.quantized": ("auto", "true", "false"),
    "data.source": ("python_docs", "fineweb_edu", "text_files"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "train.resume": ("auto", "never"),
    "controller.law": LAWS,
    "controller.error": ERRORS,
    "controller.smooth": SMOOTHS,
    "saturation.lambda_change": ("relative", "absolute"),
    "saturation.keep": KEEP_RULES,
}

_TINY_MIN_VOCAB = 260  # 256 byte tokens + the 4 specials of the offline byte tokenizer (models/tiny.py)
_SEED_END = 2 ** 64  # mx.random.seed takes a uint64
_INT32_END = 2 ** 31  # MLX's LR schedules count steps in int32
_MAXSIZE = 2 ** 63 - 1  # a Python container length (the saturation window is a deque's maxlen)


class _Unreadable:
    """A schema key that is missing (``???``, deleted) or an interpolation that does not resolve."""

    def __init__(self, shown: str, why: str = ""):
        self.shown, self.why = shown, why

    def __repr__(self) -> str:
        return self.shown


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fin(v: Any) -> bool:
    try:
        return _is_num(v) and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _type_ok(tp: Any, v: Any) -> bool:
    """Does ``v`` have the schema type ``tp`` (int, float, bool, str, Optional[...], List[str])?"""
    if tp is Any:
        return True
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return any(_type_ok(a, v) for a in args)
    if origin is list:
        return isinstance(v, list) and all(_type_ok(args[0] if args else Any, x) for x in v)
    if tp is type(None):
        return v is None
    if tp is float:
        return _is_num(v)
    if tp is int:
        return _is_int(v)
    return isinstance(v, tp)


def _type_text(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"a list of {_type_text(args[0])[2:]}s" if args else "a list"
    return {int: "an int", float: "a float", bool: "true or false", str: "a string"}.get(tp, str(tp))


@lru_cache(maxsize=None)
def _schema(dc: Any) -> dict:
    """{field: type, or a nested dict for a nested dataclass}, in declaration order."""
    hints = get_type_hints(dc)
    return {f.name: _schema(hints[f.name]) if is_dataclass(hints[f.name]) else hints[f.name] for f in fields(dc)}


def _leaf_types(schema: dict, prefix: str = "") -> dict:
    """{dotted key: type} of every leaf of a :func:`_schema`."""
    out = {}
    for k, tp in schema.items():
        out.update(_leaf_types(tp, f"{prefix}{k}.") if isinstance(tp, dict) else {prefix + k: tp})
    return out


def _plain(node: Any, skip: tuple = ()) -> Any:
    """A DictConfig as plain dicts/lists; a missing or unresolvable value becomes :class:`_Unreadable`."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out = {}
    for key in node.keys():
        if key in skip:
            continue
        try:
            if OmegaConf.is_missing(node, key):
                value = _Unreadable("???", "missing")
            else:
                value = node[key]
                if isinstance(value, DictConfig):
                    value = _plain(value)
                elif isinstance(value, ListConfig):
                    value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            raw = OmegaConf.to_container(node, resolve=False)[key]
            value = _Unreadable(repr(raw), f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__)
        out[str(key)] = value
    return out


def _flatten(cfg: Any) -> tuple:
    """({dotted schema key: value}, [messages for keys the schema does not have])."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    values, unknown = {}, []

    def walk(schema: dict, node: dict, prefix: str) -> None:
        for k, v in node.items():
            if k not in schema:
                where = f"under {prefix[:-1]}" if prefix else "at the top level"
                unknown.append(f"{prefix}{k}={v!r}: allowed only the schema's keys {where}: {', '.join(schema)}")
        for k, tp in schema.items():
            key = prefix + k
            v = node.get(k, _Unreadable("???", "missing"))
            if isinstance(tp, dict):
                if isinstance(v, dict):
                    walk(tp, v, key + ".")
                else:  # a whole group replaced by a scalar or missing: every key in it is missing
                    walk(tp, {}, key + ".")
            else:
                values[key] = v

    walk(_schema(SCUConfig), _plain(cfg, skip=("hydra",)), "")  # Hydra's own node, if composed in: not ours
    return values, unknown


class _Rule(NamedTuple):
    """``ok(value, *values of deps)``. A key's rules run in order until one fails; a rule runs
    only when its deps have the right type and (strict) passed their own rules: one bad key,
    one message."""

    key: str
    ok: Callable[..., bool]
    allowed: str
    deps: tuple = ()
    strict: bool = True


def _rules() -> list:
    """Every range rule (types come from the schema's annotations)."""
    ge = lambda lo: (lambda v: v >= lo)  # noqa: E731
    pos = (lambda v: _fin(v) and v > 0, "a float > 0")
    nonneg = (lambda v: _fin(v) and v >= 0, "a float >= 0")
    unit_open = (lambda v: _fin(v) and 0 < v < 1, "a float in (0, 1)")
    unit_half = (lambda v: _fin(v) and 0 < v <= 1, "a float in (0, 1]")
    r = [("target_s", *unit_open)]
    r += [(k, (lambda v, c=c: v in c), "one of " + ", ".join(c)) for k, c in _CHOICES.items()]
    r += [
        ("model.path", lambda v, src: src != "mlx_lm" or bool(v),
         "an mlx-lm model dir or hub repo id (model.source=mlx_lm needs one)", ("model.source",)),
        ("model.max_seq_len", lambda v: v is None or v >= 1, "null (the model's own context) or an int >= 1"),
        ("model.seed", lambda v: 0 <= v < _SEED_END, "an int in [0, 2**64)"),
        ("model.prior_sigma", lambda v: v is None or (_fin(v) and v > 0), "null or a float > 0 (prior=default's σ)"),
        ("model.data_tokens", lambda v: v is None or v >= 1, "null or an int >= 1 (data=python_docs' token budget)"),
        ("model.tiny.vocab_size", ge(_TINY_MIN_VOCAB), f"an int >= {_TINY_MIN_VOCAB} (256 bytes + 4 specials)"),
        *((f"model.tiny.{k}", ge(1), "an int >= 1") for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")),
        ("model.tiny.num_key_value_heads", lambda v, h: h % v == 0,
         "an int >= 1 dividing model.tiny.num_attention_heads", ("model.tiny.num_attention_heads",)),
        ("model.tiny.hidden_size", lambda v, h: v // h >= 2 and (v // h) % 2 == 0,
         "an int whose quotient by model.tiny.num_attention_heads (the head size) is even and >= 2 (RoPE)",
         ("model.tiny.num_attention_heads",)),
        ("data.paths", lambda v, src: src != "text_files" or len(v) > 0,
         "a non-empty list of txt/jsonl/parquet files (data.source=text_files)", ("data.source",)),
        ("data.hf_path", lambda v, src: src != "fineweb_edu" or bool(v),
         "a hub dataset id or a local dataset dir (data.source=fineweb_edu needs one)", ("data.source",)),
        ("data.max_tokens", lambda v: v is None or v >= 1, "null or an int >= 1"),
        ("data.max_tokens", lambda v, src: src != "fineweb_edu" or v is not None,
         "an int >= 1 (a streamed corpus needs a token budget)", ("data.source",)),
        ("data.max_tokens", lambda v, n: v is None or v >= 2 * (n + 1),
         "null or an int >= 2 * (train.seq_len + 1) (one train and one validation sequence)", ("train.seq_len",)),
        ("data.val_fraction", *unit_open),
        ("data.split_seed", ge(0), "an int >= 0"),
        ("prior.sigma", *pos),
        ("prior.sigma", lambda v: v * v > 0, "a float > 0 whose square does not underflow to 0 (>= 1e-161)"),
        *((f"controller.{k}", *nonneg) for k in ("kp", "ki", "deadband")),
        ("controller.ema_alpha", *unit_half),
        ("controller.leak", *unit_half),
        ("controller.control_every", ge(1), "an int >= 1"),
        ("controller.e_max", *pos),
        ("controller.i_min", lambda v: _fin(v) and v <= 0, "a float <= 0"),
        ("controller.i_max", lambda v: _fin(v) and v >= 0, "a float >= 0"),
        ("controller.lambda_min", *pos),
        ("controller.lambda_max", *pos),
        ("controller.lambda_max", lambda v, lo: v >= lo, "a float >= controller.lambda_min", ("controller.lambda_min",)),
        ("controller.lambda_init", *pos),
        ("controller.lambda_init", lambda v, lo, hi: lo <= v <= hi,
         "a float in [controller.lambda_min, controller.lambda_max]",
         ("controller.lambda_min", "controller.lambda_max")),
        ("saturation.window", lambda v: 1 <= v < _MAXSIZE, "an int >= 1 (and < 2**63 - 1)"),
        ("saturation.lambda_eps", *pos),
        ("saturation.s_tolerance", *pos),
        ("saturation.patience", ge(0), "an int >= 0"),
        ("saturation.patience_epochs", *nonneg),
        ("saturation.min_delta", *nonneg),
        ("saturation.min_steps", ge(0), "an int >= 0"),
        *((f"train.{k}", ge(1), "an int >= 1")
          for k in ("steps", "batch_size", "seq_len", "eval_every", "val_batches", "log_every")),
        ("train.lr", *pos),
        ("train.diverge_factor", lambda v: _fin(v) and v > 1, "a float > 1"),
        ("train.seed", lambda v: 0 <= v < _SEED_END, "an int in [0, 2**64)"),
        ("train.warmup_steps", lambda v: 0 <= v < _INT32_END, "an int >= 0 (and < 2**31)"),
        ("train.checkpoint_every", ge(0), "an int >= 0 (0: no checkpoints)"),
        ("train.ranks", ge(1), "an int >= 1 dividing train.batch_size"),
        ("train.ranks", lambda v, b: b % v == 0, "an int >= 1 dividing train.batch_size", ("train.batch_size",)),
        ("lora.rank", ge(1), "an int >= 1"),
        ("lora.alpha", *pos),
        ("lora.dropout", lambda v: _fin(v) and 0 <= v < 1, "a float in [0, 1)"),
        ("lora.num_layers", lambda v: v == -1 or v >= 1, "-1 (every block) or an int >= 1 (the last N blocks)"),
        ("pruning.trial_number", lambda v: v is None or v >= 0, "null or an int >= 0"),
    ]
    link = ("pruning.storage", "pruning.study_name", "pruning.trial_number")
    r += [(k, lambda v, a, b: v is not None or (a is None and b is None),
           "set when the other pruning.* keys are (the optuna sweeper sets all three) or null with them",
           tuple(o for o in link if o != k), False) for k in link]
    return [_Rule(*x) for x in r]


_QUOTE_HINT = {"model.quantized": " (strings: a bare true/false is a bool, quote it: model.quantized='true')"}


def _problems(cfg: Any) -> list:
    """One message per offending key, in schema order: unknown, missing, wrong type, out of range."""
    values, bad = _flatten(cfg)
    types = _leaf_types(_schema(SCUConfig))
    rules = _rules()
    first_allowed = {}
    for rule in rules:
        if not rule.deps:  # a key's own range; a rule tying it to others would say too little here
            first_allowed.setdefault(rule.key, rule.allowed)
    failed = {}
    for key, v in values.items():
        if isinstance(v, _Unreadable) or not _type_ok(types[key], v):
            allowed = first_allowed.get(key, _type_text(types[key]))
            why = f" ({v.why})" if isinstance(v, _Unreadable) and v.why != "missing" else ""
            failed[key] = f"{key}={v!r}: allowed {allowed}{why}"
    mistyped = set(failed)
    for key, pred, allowed, deps, strict in rules:
        if key in failed or any(d in (failed if strict else mistyped) for d in deps):
            continue
        if not pred(values[key], *(values[d] for d in deps)):
            failed[key] = f"{key}={values[key]!r}: allowed {allowed}{_QUOTE_HINT.get(key, '')}"
    return bad + [failed[k] for k in values if k in failed]


def validate(cfg: Any) -> None:
    """Raise ConfigError naming every offending key on one line (``KEY=VALUE: allowed ...; ...``).

    Checks every key of :class:`SCUConfig`: unknown keys (added with ``+key=``), missing
    or unresolvable values, types (also for configs loaded without the schema) and ranges.
    """
    bad = _problems(cfg)
    if bad:
        raise ConfigError("; ".join(bad))
