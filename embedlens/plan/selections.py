"""The token selections a plan gives its plugins, checked when it loads: a group name must be one its partition defines.

A selection such as ``tokens: dead`` names a group of the run's partition; a
misspelt one (``tokens: ded``) would otherwise fail only when the first batch
runs, after the model has loaded. Here it is refused with the key, the
closest names and what exists, before anything heavy happens.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from embedlens.errors import EmbedLensError
from embedlens.registry import interventions, probes


def selection_params(cls: type) -> list[str]:
    """The constructor parameters of plugin `cls` that take a selection (annotated ``SelectionSpec``)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return []
    return [name for name, p in sig.parameters.items() if "SelectionSpec" in str(p.annotation)]


def check_selections(loaded: Any) -> None:  # an embedlens.plan.loader.LoadedPlan (the loader imports this module)
    """Every selection parameter of the plan's probes and conditions parses, and its group names are the partition's.

    Raises:
        PlanError: at the parameter's key, with close matches and the names that exist.
    """
    from embedlens.groups import Partition
    from embedlens.interventions.select import CONSTANTS, ROLE_NAMES, Selection

    plan = loaded.plan
    groups: tuple[str, ...] = ()
    if plan.partition is not None:
        try:
            groups = Partition(**plan.partition.model_dump()).names
        except EmbedLensError:
            return  # the partition's own error is raised, at its key, where the model is known (prepare)
    entries = [(("probes", i), probes, spec) for i, spec in enumerate(plan.probes)]
    entries += [(("conditions", cname, i), interventions, spec)
                for cname, items in plan.conditions.items() for i, spec in enumerate(items)]
    for loc, registry, spec in entries:
        try:
            cls = registry.get(spec.name)  # the plugin's module alone (`in` would import every plugin)
        except EmbedLensError:
            continue  # named by the plugin check
        for key in selection_params(cls):
            value = spec.params.get(key)
            if not isinstance(value, str):
                continue  # a default (the plugin's own) or a list of indices
            prefix = f"condition {loc[1]!r} ({spec.name}): " if loc[0] == "conditions" else ""  # as prepare words it
            try:
                sel = Selection.parse(value)
            except EmbedLensError as e:
                raise loaded.error((*loc, "params", key), prefix + str(e)) from None
            for name in sorted(sel.group_names() - set(groups)):
                known = [*ROLE_NAMES, *CONSTANTS, *groups]
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                where = (f"The plan's partition defines the groups {', '.join(groups)}" if groups else
                         "The plan has no partition (a partition: block or a token_partition probe) to define groups")
                raise loaded.error((*loc, "params", key), f"{prefix}unknown group {name!r} in selection {value!r}.{hint} "
                                   f"{where}; token roles: {', '.join(ROLE_NAMES)}")
