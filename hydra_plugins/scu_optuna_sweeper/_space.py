"""Search space: Hydra sweep overrides -> Optuna distributions, and values back to overrides.

``a,b`` / ``choice(a,b)`` -> categorical; ``range(a,b,s)`` -> int or stepped float;
``interval(a,b)`` -> float; ``tag(log, ...)`` log scale; ``tag(int, interval(a,b))`` ints.
Pure functions; the tests parametrize them.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import optuna
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep


def distribution(override: Override) -> Optional[optuna.distributions.BaseDistribution]:
    """The Optuna distribution of one sweep override; None for a fixed value.

    ``a,b`` / ``choice(a,b)`` -> categorical; ``range(a,b,s)`` -> int (float when any
    bound is a float) over the values the range yields; ``interval(a,b)`` -> float.
    Tags: ``log`` (log scale), ``int`` (an interval over integers).
    """
    if not override.is_sweep_override():
        return None
    key, sweep = override.get_key_element(), override.value()
    if not isinstance(sweep, (ChoiceSweep, RangeSweep, IntervalSweep)):
        raise ValueError(f"{key}: {type(sweep).__name__} is not supported; use choice, range "
                         "or interval")
    tags = set(sweep.tags)
    unknown = tags - {"log", "int"}
    if unknown:
        raise ValueError(f"{key}: unknown tag(s) {sorted(unknown)}; allowed log, int")
    log_scale = "log" in tags
    if isinstance(sweep, ChoiceSweep):
        if tags:
            raise ValueError(f"{key}: tags {sorted(tags)} do not apply to choice()")
        choices = [Override._convert_value(x) for x in sweep.list]
        bad = [c for c in choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if bad:
            raise ValueError(f"{key}: choice values must be scalars, got {bad}")
        return optuna.distributions.CategoricalDistribution(choices)
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{key}: empty range")
        low, high, step = min(values), max(values), abs(sweep.step)
        if all(isinstance(v, int) for v in values) and isinstance(sweep.step, int):
            return optuna.distributions.IntDistribution(
                low, high, log=log_scale, step=1 if log_scale else step)
        if log_scale:
            raise ValueError(f"{key}: tag(log, range()) needs integer bounds and step 1")
        return optuna.distributions.FloatDistribution(float(low), float(high), step=float(step))
    if "int" in tags:
        return optuna.distributions.IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
    return optuna.distributions.FloatDistribution(sweep.start, sweep.end, log=log_scale)


def search_space(overrides: Sequence[Override]
                 ) -> Tuple[List[str], Dict[str, optuna.distributions.BaseDistribution]]:
    """Split parsed overrides into fixed ``key=value`` strings and sampled distributions.

    A later override of the same key wins (command line over ``hydra.sweeper.params``).
    """
    fixed: Dict[str, str] = {}
    space: Dict[str, optuna.distributions.BaseDistribution] = {}
    for override in overrides:
        key = override.get_key_element()
        fixed.pop(key, None)
        space.pop(key, None)
        dist = distribution(override)
        if dist is None:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
        else:
            space[key] = dist
    return list(fixed.values()), space


def grid(space: Dict[str, optuna.distributions.BaseDistribution]) -> Dict[str, List[Any]]:
    """The GridSampler's search space: every value of each choice or stepped range."""
    out: Dict[str, List[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            out[key] = list(dist.choices)
        elif getattr(dist, "step", None) is not None and not getattr(dist, "log", False):
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            out[key] = [type(dist.low)(dist.low + i * dist.step) for i in range(n)]
        else:
            raise ValueError(f"{key}: the grid sampler takes choice() or range(), not {dist}")
    return out


_PLAIN = re.compile(r"[A-Za-z_][\w\-./]*\Z")


def quote(text: str) -> str:
    """``text`` as a single-quoted Hydra override value."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)\Z", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def format_value(value: Any) -> str:
    """A sampled value as override text that Hydra parses back to the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    plain = _PLAIN.match(text) and text.lower() not in ("true", "false", "null", "nan", "inf")
    return text if plain else quote(text)
