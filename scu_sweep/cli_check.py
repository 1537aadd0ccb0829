"""Command-line overrides Hydra would refuse with a dozen lines and exit 1, refused here with one
line naming the key and what is allowed, exit 2, before anything runs: a group choice with no
config (``model=nosuch``), a key the config does not have (``nosuchkey=1``), a value of the
wrong type (``target_s=abc``). Every value of a ``choice``/``range`` sweep is checked."""

from __future__ import annotations

import sys
from typing import Any, List, Optional

# these change where configs are found: Hydra alone knows the options then
_SEARCH_ARGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _values(o: Any) -> Optional[list]:
    """The values an override sets (each of a choice or range sweep); None for other sweeps."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    if not o.is_sweep_override():
        return [o.value()]
    return list(o.sweep_iterator()) if isinstance(o.value(), (ChoiceSweep, RangeSweep)) else None


def _text(v: Any) -> str:
    """A value as the command line spells it."""
    return {None: "null", True: "true", False: "false"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def command_line_error(argv: List[str], conf_dir: str) -> Optional[str]:
    """The one-line error for the first refused override of ``argv``, or None."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if any(a.split("=")[0] in _SEARCH_ARGS for a in argv):
        return None
    args, _ = get_args_parser().parse_known_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:  # a grammar error: Hydra reports it
        return None
    if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
        return None
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        repo = GlobalHydra.instance().config_loader().repository
        groups, settings = [], []
        for o in parsed:
            if o.is_delete() or o.is_add() or o.is_force_add() or o.key_or_group.startswith("hydra."):
                continue
            values = _values(o)
            if values is None:  # glob(...), interval(...): Hydra or the sweeper reads them
                continue
            if not repo.group_exists(o.key_or_group):
                settings.append((o, values))
                continue
            options = repo.get_group_options(o.key_or_group)
            for v in values:
                if v not in options:
                    return f"{o.key_or_group}={_text(v)}: allowed one of {', '.join(options)}"
            groups.append(f"{o.key_or_group}={values[0]}")
        if not settings:
            return None
        try:
            cfg = compose("config", overrides=groups)
        except HydraException:
            return None
        for o, values in settings:
            for v in values:
                if isinstance(v, str) and "${" in v:
                    continue  # an interpolation: resolved later
                try:
                    OmegaConf.update(cfg, o.key_or_group, v, merge=True)
                except (ConfigKeyError, ConfigAttributeError):
                    return (f"{o.key_or_group}={_text(v)}: no such key; allowed the keys of the composed config "
                            f"(python -m scu_sweep --cfg job lists them; +{o.key_or_group}=... adds one)")
                except ValidationError as e:
                    reason = str(e).splitlines()[0]
                    return f"{o.key_or_group}={_text(v)}: {reason}; allowed a value of the key's type"
    return None


def check_command_line(argv: List[str], conf_dir: str) -> None:
    error = command_line_error(argv, conf_dir)
    if error is not None:
        print(f"scu_sweep: error: {error}", file=sys.stderr)
        sys.exit(2)
