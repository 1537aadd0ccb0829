"""Property-based fuzzing of the configuration surface (every key of ``SCUConfig``).

Hypothesis draws command-line overrides: values for schema keys (ints, floats with
nan/inf/negative/huge, strings, bools, null, lists, interpolations, ``???``), unknown keys
(plain, ``+key=``, ``++key=``), deletions (``~key``), additions on existing keys and group
choices. Each composed config must end in exactly one of:

* a Hydra composition error (or an OmegaConf error it wraps) whose message names a key
  of the overrides;
* ``ConfigError`` from ``validate()``: one line, every entry ``KEY=VALUE: allowed ...``
  with KEY one of the overridden keys or tied to them, and exactly the keys that the
  independent oracle below finds invalid (every offender at once, nothing more);
* a config that validates, in which the oracle finds every value valid: no combination
  trains with an invalid setting.

The oracle restates the allowed ranges of DESIGN §3 and of the schema's comments
(scu_sweep/config.py) without calling into config.py's rules. A few bad drawn overrides
also go through the real CLI (``-m 'not slow'`` skips them): non-zero exit, no traceback,
the key named, no summary.json.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from scu_sweep.config import ConfigError, SCUConfig
from scu_sweep.validation import validate

from conftest import CONF, cli, compose_cfg

FUZZ_EXAMPLES = 200  # configurations composed and judged per run of the in-process property
CLI_EXAMPLES = 6  # bad drawn configurations run through `python -m scu_sweep` (slow)
CLI_BASE = ["model=tiny", "logger=none", "train.steps=2"]


# --------------------------------------------------------------------------- the schema

def _leaf_types(dc, prefix=""):
    """{dotted key: annotation} for every leaf of a dataclass schema, in declaration order."""
    hints = typing.get_type_hints(dc)
    out = {}
    for f in dataclasses.fields(dc):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


LEAVES = _leaf_types(SCUConfig)
NODES = sorted({k.rsplit(".", 1)[0] + "." for k in LEAVES if "." in k} | {""})  # "" = the top level
GROUP_OPTIONS = {g: sorted(p.stem for p in (Path(CONF) / g).glob("*.yaml"))
                 for g in ("model", "data", "prior", "controller", "saturation", "train", "lora", "logger", "experiment")}
TAKEN = ({k.rsplit(".", 1)[-1] for k in LEAVES} | {n.rstrip(".").rsplit(".", 1)[-1] for n in NODES}
         | set(GROUP_OPTIONS) | {"hydra"})  # names an "unknown" key must not have

# Keys whose validity depends on each other: a message may name any key of a group one
# of whose keys was overridden.
RELATED = [
    {"controller.lambda_min", "controller.lambda_max", "controller.lambda_init"},
    {"train.ranks", "train.batch_size"},
    {"prior.sigma", "model.prior_sigma"},  # prior=default's σ is ${model.prior_sigma}
    {"data.max_tokens", "train.seq_len", "data.source", "model.data_tokens"},  # python_docs: ${model.data_tokens}
    {"data.paths", "data.source"},
    {"data.hf_path", "data.source"},
    {"model.path", "model.source"},
    {"model.tiny.hidden_size", "model.tiny.num_attention_heads", "model.tiny.num_key_value_heads"},
    {"pruning.storage", "pruning.study_name", "pruning.trial_number"},
]


# --------------------------------------------------------------------------- the oracle

_NO = object()  # a schema key the config does not have


def _int(v):
    return type(v) is int


def _num(v):
    return type(v) in (int, float)


def _finite(v):
    try:
        return _num(v) and math.isfinite(float(v))
    except OverflowError:
        return False


def _opt(check):
    return lambda v: v is None or check(v)


def _strs(v):
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is(*allowed):
    return lambda v: v in allowed


def _int_at_least(lo, below=None):
    return lambda v: _int(v) and v >= lo and (below is None or v < below)


def _float_in(lo, hi, lo_open=True, hi_open=True):
    def check(v):
        if not _finite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return check


_STR, _OSTR, _BOOL = (lambda v: isinstance(v, str)), _opt(lambda v: isinstance(v, str)), (lambda v: type(v) is bool)
_POS = _float_in(0, math.inf)
_NONNEG = _float_in(0, math.inf, lo_open=False)
_COUNT = _int_at_least(1)
_SEED = _int_at_least(0, 2 ** 64)  # mx.random.seed takes a uint64

# Each key on its own: DESIGN §3's bad-input list and the ranges in config.py's comments.
ALONE = {
    "target_s": _float_in(0, 1),
    "model.name": _STR, "model.source": _is("tiny", "gguf", "mlx_lm"), "model.path": _OSTR, "model.gguf": _OSTR,
    "model.quantized": _is("auto", "true", "false"), "model.max_seq_len": _opt(_COUNT), "model.seed": _SEED,
    "model.prior_sigma": _opt(_POS), "model.data_tokens": _opt(_COUNT),
    "model.tiny.vocab_size": _int_at_least(256 + 4),  # bytes + the byte tokenizer's 4 specials
    **{f"model.tiny.{k}": _COUNT for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
    "data.name": _STR, "data.source": _is("python_docs", "fineweb_edu", "text_files"), "data.paths": _strs,
    "data.hf_path": _OSTR, "data.hf_name": _OSTR, "data.split": _STR, "data.text_field": _STR,
    "data.max_tokens": _opt(_COUNT), "data.val_fraction": _float_in(0, 1), "data.split_seed": _int_at_least(0),
    "prior.sigma": lambda v: _POS(v) and v * v > 0,  # σ² divides the penalty: it must not underflow to 0
    "controller.law": _is("positional", "incremental"), "controller.error": _is("relative", "absolute"),
    "controller.smooth": _is("data_bpt", "data_bpt_epoch", "s"), "controller.control_every": _COUNT, "controller.e_max": _POS,
    "controller.kp": _NONNEG, "controller.ki": _NONNEG, "controller.deadband": _NONNEG,
    "controller.ema_alpha": _float_in(0, 1, hi_open=False), "controller.leak": _float_in(0, 1, hi_open=False),
    "controller.i_min": _float_in(-math.inf, 0, hi_open=False), "controller.i_max": _float_in(0, math.inf, lo_open=False),
    "controller.lambda_init": _POS, "controller.lambda_min": _POS, "controller.lambda_max": _POS,
    "controller.fixed": _BOOL,
    "saturation.enabled": _BOOL, "saturation.window": _int_at_least(1, 2 ** 63 - 1),  # a deque's maxlen
    "saturation.lambda_eps": _POS, "saturation.s_tolerance": _POS,
    "saturation.lambda_change": _is("relative", "absolute"), "saturation.min_delta": _NONNEG,
    "saturation.patience": _int_at_least(0), "saturation.patience_epochs": _NONNEG,
    "saturation.min_steps": _int_at_least(0),
    "saturation.keep": _is("best_in_band", "last"),
    **{f"train.{k}": _COUNT for k in ("steps", "batch_size", "seq_len", "eval_every", "val_batches", "log_every", "ranks")},
    "train.lr": _POS, "train.seed": _SEED, "train.diverge_factor": lambda v: _finite(v) and v > 1,
    "train.warmup_steps": _int_at_least(0, 2 ** 31),  # MLX's schedules count steps in int32
    "train.checkpoint_every": _int_at_least(0), "train.resume": _is("auto", "never"),
    "lora.rank": _COUNT, "lora.alpha": _POS, "lora.dropout": _float_in(0, 1, lo_open=False), "lora.keys": _strs,
    "lora.num_layers": lambda v: _int(v) and (v == -1 or v >= 1),
    "logger.name": _is("wandb", "none"), "logger.mode": _is("offline", "online", "disabled"), "logger.project": _STR,
    "logger.entity": _OSTR, "logger.group": _OSTR, "logger.tags": _strs, "logger.log_adapter": _BOOL,
    "pruning.storage": _OSTR, "pruning.study_name": _OSTR, "pruning.trial_number": _opt(_int_at_least(0)),
}


LINK_TYPES = {"pruning.storage": _OSTR, "pruning.study_name": _OSTR, "pruning.trial_number": _opt(_int)}


def _tied(v):
    """Checks between keys, in an order where a key's partners are judged first: (key, partners, ok)."""
    link = ("pruning.storage", "pruning.study_name", "pruning.trial_number")
    return [
        ("controller.lambda_max", ("controller.lambda_min",),
         lambda: v["controller.lambda_max"] >= v["controller.lambda_min"]),
        ("controller.lambda_init", ("controller.lambda_min", "controller.lambda_max"),
         lambda: v["controller.lambda_min"] <= v["controller.lambda_init"] <= v["controller.lambda_max"]),
        ("train.ranks", ("train.batch_size",), lambda: v["train.batch_size"] % v["train.ranks"] == 0),
        ("model.path", ("model.source",), lambda: v["model.source"] != "mlx_lm" or bool(v["model.path"])),
        ("data.paths", ("data.source",), lambda: v["data.source"] != "text_files" or len(v["data.paths"]) > 0),
        ("data.hf_path", ("data.source",), lambda: v["data.source"] != "fineweb_edu" or bool(v["data.hf_path"])),
        ("data.max_tokens", ("data.source",), lambda: v["data.source"] != "fineweb_edu" or v["data.max_tokens"] is not None),
        # a corpus of at least two sequences of seq_len + 1 tokens (one train, one validation)
        ("data.max_tokens", ("train.seq_len",),
         lambda: v["data.max_tokens"] is None or v["data.max_tokens"] >= 2 * (v["train.seq_len"] + 1)),
        ("model.tiny.num_key_value_heads", ("model.tiny.num_attention_heads",),
         lambda: v["model.tiny.num_attention_heads"] % v["model.tiny.num_key_value_heads"] == 0),  # grouped-query attention
        ("model.tiny.hidden_size", ("model.tiny.num_attention_heads",),  # RoPE needs an even head size
         lambda: (v["model.tiny.hidden_size"] // v["model.tiny.num_attention_heads"]) % 2 == 0
         and v["model.tiny.hidden_size"] // v["model.tiny.num_attention_heads"] >= 2),
    ] + [(k, tuple(o for o in link if o != k), lambda k=k: v[k] is not None or all(v[o] is None for o in link if o != k))
         for k in link]


def oracle(cfg: DictConfig) -> set:
    """The keys of a composed config that hold something invalid (unknown keys included)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    bad = set()

    def unknown(node, prefix):
        for k, val in node.items():
            key = prefix + str(k)
            if key not in LEAVES and not any(n.startswith(key + ".") for n in NODES):
                bad.add(key)
            elif isinstance(val, dict):
                unknown(val, key + ".")

    unknown(raw, "")
    values = {}
    for key in LEAVES:
        try:
            val = OmegaConf.select(cfg, key, default=_NO, throw_on_missing=True, throw_on_resolution_failure=True)
            if isinstance(val, (DictConfig, ListConfig)):
                val = OmegaConf.to_container(val, resolve=True, throw_on_missing=True)
        except Exception:  # missing (???) or an interpolation that does not resolve
            val = _NO
        if val is _NO or not ALONE[key](val):
            bad.add(key)
        values[key] = val
    unusable = {k for k in LINK_TYPES if values[k] is _NO or not LINK_TYPES[k](values[k])}
    for key, partners, ok in _tied(values):
        # the pruning link names each null key while another is set, whatever that one's range
        judged = unusable if key.startswith("pruning.") else bad
        if key not in bad and not (set(partners) & judged) and not ok():
            bad.add(key)
    return bad


# --------------------------------------------------------------------------- overrides

def _fmt_float(x: float) -> str:
    return repr(x)  # nan, inf, -inf, 1e+20, 5e-324, -0.0: all in Hydra's override grammar


IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
INTS = st.one_of(st.integers(-3, 20), st.sampled_from([64, 128, 260, 1000, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 20, -10 ** 20]))
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-4, 0.002, 0.03, 0.1, 0.2, -0.2, 0.5, 0.995, 1.0, 1.5, 2.0, 10.0, -1.0, 1e308,
                     1e-200, 5e-324, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
)
WORDS = st.sampled_from(["auto", "never", "true", "false", "tiny", "gguf", "mlx_lm", "python_docs", "fineweb_edu",
                         "text_files", "wandb", "none", "offline", "online", "disabled", "train", "org/name", "/no/such",
                         "self_attn.q_proj", "mlp.up_proj"])
STRINGS = st.one_of(
    WORDS, IDENT,
    st.text(alphabet="ab xyz,=:.-", min_size=0, max_size=8).map(lambda s: "'" + s + "'"),  # quoted
    st.sampled_from(["''", "'true'", "'1.5'", "???", "${nope}", "${train.steps}", "${target_s}", "${oc.env:SCU_FUZZ_NOPE}"]),
)
LISTS = st.one_of(
    st.sampled_from(["[]", "[self_attn.q_proj]", "[self_attn.q_proj,mlp.down_proj]", "[1,2]", "[[a]]", "[null]",
                     "[a,[b]]", "[${nope}]", "['']", "{a: 1}"]),
    st.lists(IDENT, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
)
ANY_VALUE = st.one_of(INTS.map(str), FLOATS.map(_fmt_float), st.sampled_from(["true", "false", "null"]), STRINGS, LISTS)


def _near(tp) -> st.SearchStrategy:
    """Values of roughly the key's own type: many drawn configs validate and meet the oracle."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return st.one_of(st.just("null"), *[_near(a) for a in args if a is not type(None)])
    if origin in (list, typing.List):
        return LISTS
    return {int: INTS.map(str), float: st.one_of(FLOATS.map(_fmt_float), INTS.map(str)),
            bool: st.sampled_from(["true", "false", "0", "1", "2", "yes"]), str: st.one_of(WORDS, STRINGS)}[tp]


KEYS = st.sampled_from(sorted(LEAVES))


@st.composite
def set_key(draw):
    key = draw(KEYS)
    near = draw(st.sampled_from([True] * 5 + [False]))  # mostly values of the key's own type
    return f"{key}={draw(_near(LEAVES[key]) if near else ANY_VALUE)}"


@st.composite
def unknown_key(draw):
    node, name = draw(st.sampled_from(NODES)), draw(IDENT.filter(lambda s: s not in TAKEN))
    prefix = draw(st.sampled_from(["", "+", "+", "++"]))
    tail = draw(st.sampled_from(["", ".deeper"]))
    return f"{prefix}{node}{name}{tail}={draw(ANY_VALUE)}"


@st.composite
def delete_key(draw):
    key = draw(st.one_of(KEYS, st.sampled_from([n.rstrip(".") for n in NODES if n] + list(GROUP_OPTIONS))))
    return f"~{key}"


@st.composite
def add_existing(draw):
    return f"{draw(st.sampled_from(['+', '++']))}{draw(KEYS)}={draw(ANY_VALUE)}"


@st.composite
def choose_group(draw, groups=tuple(GROUP_OPTIONS)):
    group = draw(st.sampled_from(groups))
    return f"{group}={draw(st.sampled_from(GROUP_OPTIONS[group] + ['nope']))}"


_KINDS = {"set": set_key(), "unknown": unknown_key(), "delete": delete_key(), "add": add_existing(), "group": choose_group()}
OVERRIDE = st.sampled_from(["set"] * 8 + ["unknown", "delete", "add", "group"]).flatmap(_KINDS.__getitem__)
OVERRIDES = st.lists(OVERRIDE, min_size=1, max_size=3)


def key_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def related(overrides) -> set:
    """The keys a message about these overrides may name: each key, what lies under it or above it, and its ties."""
    keys = set()
    for o in overrides:
        k = key_of(o)
        if k == "experiment":  # a preset sets keys all over the config
            keys |= set(LEAVES)
        parts = k.split(".")
        keys |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        keys |= {leaf for leaf in LEAVES if leaf.startswith(k + ".")}
    for group in RELATED:
        if group & keys:
            keys |= group
    return keys


# --------------------------------------------------------------------------- the property

def _chain(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 6:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def judge(overrides):
    """Compose and validate; assert the outcome is one of the three allowed. Returns it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_cfg(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        text = _chain(e)
        assert any(key_of(o) in text for o in overrides), f"composition error names no key of {overrides}:\n{text}"
        return "composition"
    expected = oracle(cfg)
    try:
        validate(cfg)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        entries = msg.split("; ")
        named = [x.split("=", 1)[0] for x in entries]
        assert all("=" in x and ": allowed " in x for x in entries), msg
        assert named[0] in related(overrides), f"{overrides}: the message starts with an unrelated key: {msg}"
        assert set(named) <= related(overrides), f"{overrides}: unrelated keys in {msg}"
        assert set(named) == expected, f"{overrides}: validate named {sorted(named)}, the oracle {sorted(expected)}: {msg}"
        return "refused"
    assert not expected, f"{overrides} validates but holds invalid {sorted(expected)}: " + ", ".join(
        f"{k}={OmegaConf.select(cfg, k, default='<absent>', throw_on_missing=False)!r}"
        for k in sorted(expected) if k in LEAVES)
    return "valid"


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def test_fuzzed_overrides_fail_cleanly_or_are_valid():
    """``judge`` asserts on every drawn configuration; the run as a whole must also have
    drawn all three outcomes, or the fuzzing did not reach past composition."""
    outcomes = collections.Counter()

    @FUZZ
    @given(OVERRIDES)
    def prop(overrides):
        outcomes[judge(overrides)] += 1

    prop()
    assert set(outcomes) == {"composition", "refused", "valid"}, outcomes
    assert sum(outcomes.values()) >= FUZZ_EXAMPLES, outcomes


@pytest.mark.parametrize("overrides,outcome", [
    ([], "valid"),
    (["model=tiny", "logger=none"], "valid"),
    (["data=fineweb_edu"], "valid"),
    (["experiment=optuna_tiny_kp_ki"], "valid"),
    (["train.steps=true"], "composition"),
    (["train.stepz=3"], "composition"),
    (["~train.steps"], "composition"),
    (["+train.steps=3"], "composition"),
    (["model=nope"], "composition"),
    (["+train.stepz=3"], "refused"),  # `+` bypasses the schema's struct mode: validate refuses the unknown key
    (["+foo.bar=1"], "refused"),
    (["~target_s"], "refused"),
    (["~model"], "refused"),
    (["target_s=???"], "refused"),
    (["target_s=${nope}"], "refused"),
    (["model.name=${nope}"], "refused"),
    (["lora.keys=[a,[b]]"], "refused"),
    (["lora.num_layers=0"], "refused"),
    (["lora.num_layers=-2"], "refused"),
    (["saturation.min_steps=-1"], "refused"),
    (["saturation.keep=best"], "refused"),
    (["model.max_seq_len=0"], "refused"),
    (["controller.i_max=inf"], "refused"),
    (["controller.i_max=-1"], "refused"),
    (["controller.lambda_max=0.5"], "refused"),  # lambda_init=1.0 falls outside the bounds
    (["controller.lambda_min=nan"], "refused"),
    (["train.seed=-1"], "refused"),
    (["model.seed=18446744073709551616"], "refused"),
    (["data.split_seed=-1"], "refused"),
    (["train.warmup_steps=10000000000"], "refused"),
    (["saturation.window=100000000000000000000"], "refused"),
    (["prior.sigma=1e-200"], "refused"),
    (["data.max_tokens=100"], "refused"),
    (["data=fineweb_edu", "data.max_tokens=null"], "refused"),
    (["data=fineweb_edu", "data.hf_path=null"], "refused"),
    (["model.source=mlx_lm"], "refused"),
    (["model.quantized=true"], "refused"),  # a bool, rendered 'True': models/load.py compares with the string 'true'
    (["model.tiny.num_attention_heads=3"], "refused"),
    (["model.tiny.hidden_size=60"], "refused"),  # head size 15: RoPE needs an even one
    (["pruning.storage=sqlite:///x.db"], "refused"),
    (["train.ranks=3"], "refused"),
])
def test_known_corners(overrides, outcome):
    """Cases the fuzzer found or must keep covering, each with its expected outcome."""
    assert judge(overrides) == outcome


def test_every_offender_on_one_line():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["lora.num_layers=0", "saturation.min_steps=-1", "+train.stepz=3", "~target_s"]))
    named = [x.split("=", 1)[0] for x in str(e.value).split("; ")]
    assert sorted(named) == ["lora.num_layers", "saturation.min_steps", "target_s", "train.stepz"]


def test_validate_checks_types_of_a_config_loaded_without_the_schema(tmp_path):
    """train.ranks > 1 re-loads the resolved config from YAML, untyped: validate still checks types."""
    cfg = OmegaConf.to_container(compose_cfg(["model=tiny"]), resolve=True)
    cfg["train"]["steps"] = True
    cfg["controller"]["fixed"] = "yes"
    cfg["lora"]["alpha"] = 32  # an int where a float is expected is fine
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    with pytest.raises(ConfigError) as e:
        validate(OmegaConf.load(path))
    assert sorted(x.split("=", 1)[0] for x in str(e.value).split("; ")) == ["controller.fixed", "train.steps"]


# --------------------------------------------------------------------------- the CLI

CLI_OVERRIDE = st.sampled_from(["set"] * 4 + ["unknown", "delete", "cli_group"]).flatmap(
    {**_KINDS, "cli_group": choose_group(groups=("model", "data", "prior", "logger"))}.__getitem__)  # experiments: multiruns


@pytest.mark.slow
@settings(max_examples=CLI_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
@given(st.lists(CLI_OVERRIDE, min_size=1, max_size=3))
def test_fuzzed_bad_overrides_through_the_cli(tmp_path_factory, overrides):
    overrides = CLI_BASE + overrides
    assume(judge(overrides) != "valid")
    tmp = tmp_path_factory.mktemp("cli_fuzz")
    proc = cli([*overrides, f"hydra.run.dir={tmp / 'run'}"], timeout=300)
    assert proc.returncode != 0, f"{overrides}: exit 0\n{proc.stderr[-1500:]}"
    assert "Traceback" not in proc.stderr, f"{overrides}:\n{proc.stderr[-3000:]}"
    assert any(key_of(o) in proc.stderr for o in overrides[len(CLI_BASE):]) or any(
        k in proc.stderr for k in related(overrides[len(CLI_BASE):])), f"{overrides}: no key named\n{proc.stderr[-1500:]}"
    assert not list(tmp.rglob("summary.json"))


@pytest.mark.slow
def test_cli_unresolvable_train_ranks_is_a_one_line_error(tmp_path):
    proc = cli([*CLI_BASE, "train.ranks=${nope}", f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "train.ranks" in proc.stderr, proc.stderr[-1500:]
