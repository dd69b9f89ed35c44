"""`embedlens validate`: a plan checked against each model's architecture without loading weights (or, deep, loaded).

Without ``--deep`` each model is its ``config.json`` (`embedlens.plan.architecture`): the plugins' own checks
run against a `ConfigAdapter`, the data are read, and matched controls whose pools a fixed token layout
determines are counted. ``--deep`` loads each model, as a run does, and checks what the config cannot tell
(the tokenizer's ids, the processor's prompts, the modules a site hooks).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from embedlens.errors import EmbedLensError
from embedlens.plan.architecture import Architecture, ConfigAdapter, FIXED_GRID_ADAPTERS, architecture
from embedlens.plan.loader import LoadedPlan


@dataclass
class ModelCheck:
    """What validate checked for one of the plan's models."""

    name: str
    adapter: str
    samples: int
    probes: list[str]
    conditions: list[str]
    #: the weights were loaded (``--deep``; a source without a config file: ``tiny:``, a plugin's; or a
    #: ``model.adapter`` forced onto another architecture's checkpoint, which only its weights can accept)
    loaded: bool
    #: ``(key, what it needs)`` of checks that need the loaded model: made by ``--deep`` and at run start
    unchecked: list[tuple[str, str]] = field(default_factory=list)
    #: control pools that only the run can count (a partition group's size, a per-image layout)
    pool_notes: list[str] = field(default_factory=list)


def validate_plan(loaded: LoadedPlan, deep: bool = False) -> list[ModelCheck]:
    """Check every model of a loaded plan; without `deep`, from the config alone where the source has one.

    Raises:
        PlanError: the first problem, naming the file, line and key.
    """
    from embedlens.plan.pools import check_fixed_pools
    from embedlens.plan.preparation import check_model_spec, model_error, prepare

    out = []
    for name, m in loaded.plan.model_specs().items():
        check_model_spec(loaded, name)
        try:
            arch = architecture(loaded.model_source(m.source), m.adapter, m.remote)
        except EmbedLensError as e:
            raise model_error(loaded, name, e) from None
        if arch is not None and not deep and not arch.forced_elsewhere:
            if m.quantization is not None:  # what loading would ask of this installation (bitsandbytes, a GPU)
                from embedlens.adapters.placement import quantization_config

                try:
                    quantization_config(m.quantization)
                except EmbedLensError as e:
                    raise model_error(loaded, name, e) from None
            processor_unchecked = []
            if m.processor_kwargs:  # the family's keys and types; the bounds against the processor's own: --deep
                from embedlens.adapters.processor_options import check_processor_kwargs
                from embedlens.registry import adapters

                try:
                    check_processor_kwargs(adapters.get(arch.adapter), m.processor_kwargs)
                except EmbedLensError as e:
                    raise model_error(loaded, name, e) from None
                processor_unchecked.append(("model.processor_kwargs", "the processor (each min_ setting against its max_)"))
            prepared = prepare(loaded, adapter=ConfigAdapter(arch), model=name)
            prepared.unchecked[:0] = processor_unchecked
        else:
            # a device map's disk modules need a folder to offload to, as run gives them its run folder; a
            # temporary one here, so validate accepts (and refuses) the same maps as run
            with tempfile.TemporaryDirectory(prefix="embedlens-validate-") as tmp:
                prepared = prepare(loaded, model=name, run_dir=Path(tmp))
            if arch is None and prepared.adapter.name in FIXED_GRID_ADAPTERS:  # a tiny: model: its config, now loaded
                arch = Architecture.from_config(m.source, prepared.adapter.name, prepared.adapter.config.to_dict())
        notes = check_fixed_pools(loaded, arch.fixed_grid() if arch is not None else None,
                                  arch.kept_cls() if arch is not None else False, prepared.conditions, prepared.records)
        out.append(ModelCheck(name, prepared.adapter.name, len(prepared.records), [n for n, _ in prepared.probes],
                              [c.name for c in prepared.conditions], not isinstance(prepared.adapter, ConfigAdapter),
                              prepared.unchecked, notes))
    return out
