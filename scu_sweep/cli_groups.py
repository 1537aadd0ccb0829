"""A config-group choice that does not exist (``model=nosuch``, ``hydra/sweeper/pruner=x``)
is bad input: one line naming the group and its options, exit 2, before Hydra composes
anything (Hydra's own report is a dozen lines and exits 1)."""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

# these change where configs are found: Hydra alone knows the options then
_SEARCH_ARGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def unknown_choice(argv: List[str], conf_dir: str) -> Optional[Tuple[str, str, List[str]]]:
    """(group, value, options) of the first command-line group choice with no config, or None."""
    from hydra import initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

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
        for o in parsed:
            if o.is_delete() or not repo.group_exists(o.key_or_group):
                continue
            if o.is_sweep_override() and not isinstance(o.value(), ChoiceSweep):
                continue  # glob(...): Hydra matches it against the options itself
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            options = repo.get_group_options(o.key_or_group)
            for v in values:
                if isinstance(v, str) and v not in options:
                    return o.key_or_group, v, options
    return None


def check_group_choices(argv: List[str], conf_dir: str) -> None:
    found = unknown_choice(argv, conf_dir)
    if found is not None:
        group, value, options = found
        print(f"scu_sweep: error: {group}={value}: allowed one of {', '.join(options)}", file=sys.stderr)
        sys.exit(2)
