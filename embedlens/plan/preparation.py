"""Prepare a run: load the plan's model, build its plugins and check them against the model, read the data.

Everything that can be checked before the first batch is checked here, as a
plan error naming the file, line and key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from embedlens.adapters import load_model
from embedlens.adapters.base import Adapter
from embedlens.adapters.placement import DeviceMapError, Placement, check_device_map
from embedlens.adapters.processor_options import ProcessorOptionError, configure_processor
from embedlens.data import Record, Sample, read_hf_dataset, read_records
from embedlens.errors import EmbedLensError, ParameterError
from embedlens.groups import Partition
from embedlens.interventions.condition import Condition
from embedlens.metrics import Metric
from embedlens.plan import distributed
from embedlens.plan.architecture import NeedsModel, needs
from embedlens.plan.conclusions import breakdown_fields
from embedlens.plan.loader import LoadedPlan
from embedlens.plan.schema import ModelSpec
from embedlens.plan.store import offload_dir
from embedlens.probes.base import Probe
from embedlens.registry import interventions as intervention_registry
from embedlens.registry import metrics as metric_registry
from embedlens.registry import probes as probe_registry


@dataclass
class Prepared:
    """Everything a run needs, checked against the loaded model before the first batch."""

    loaded: LoadedPlan
    adapter: Adapter
    probes: list[tuple[str, Probe]]
    records: list[Record]
    conditions: list[Condition] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    partition: Partition | None = None
    model_name: str = "model"
    #: Checks a weightless `embedlens.plan.architecture.ConfigAdapter` could not make: ``(key path, what it needs)``.
    unchecked: list[tuple[str, str]] = field(default_factory=list)


def _model_loc(loaded: LoadedPlan, name: str) -> tuple:
    return ("models", name) if loaded.plan.models is not None else ("model",)


def load_plan_model(loaded: LoadedPlan, name: str | None = None, run_dir: Path | None = None) -> tuple[str, Adapter]:
    """Load one of the plan's models (the only one when `name` is None); errors point at its entry.

    Args:
        run_dir: the run folder; modules a device map sends to ``disk`` are offloaded into its ``offload/``.
    """
    specs = loaded.plan.model_specs()
    if name is None:
        name = next(iter(specs))
    m: ModelSpec = specs[name]
    loc = _model_loc(loaded, name)
    device = check_model_spec(loaded, name)
    placement = None
    if m.device_map is not None or m.quantization is not None:
        placement = Placement(m.device_map, m.max_memory, offload_dir(run_dir) if run_dir is not None else None, m.quantization)
    try:
        adapter = load_model(loaded.model_source(m.source), adapter=m.adapter, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
                             placement=placement, remote=m.remote)
    except DeviceMapError as e:
        raise _device_map_error(loaded, loc, e) from None
    except EmbedLensError as e:
        raise model_error(loaded, name, e) from None
    except MemoryError:
        raise loaded.error((*loc, "source"), f"not enough memory to load {m.source!r}") from None
    except Exception as e:  # noqa: BLE001 - transformers / safetensors raise many types for a broken model folder
        msg = f"{type(e).__name__}: {e}".strip()
        if m.attn_implementation and "attn" in msg.lower():
            raise loaded.error((*loc, "attn_implementation"), f"{m.attn_implementation!r} cannot be used with this model ({msg[:400]})") from None
        if m.device_map is not None and any(w in msg.lower() for w in ("device_map", "device map", "offload", "meta tensor")):
            raise loaded.error((*loc, "device_map"), f"{m.source!r} cannot be placed by this device map: {msg[:600]}") from None
        raise loaded.error((*loc, "source"), f"cannot load the model from {m.source!r}: {msg[:600]}") from None
    try:
        configure_processor(adapter, m.processor_kwargs)
    except ProcessorOptionError as e:
        raise model_error(loaded, name, e) from None
    return name, adapter


def check_model_spec(loaded: LoadedPlan, name: str) -> str:
    """What a model entry asks for, checked before anything loads: its device, device map and remote use.

    Returns:
        the device the model goes to (under torchrun, each process's own GPU).
    """
    m: ModelSpec = loaded.plan.model_specs()[name]
    loc = _model_loc(loaded, name)
    device = m.device
    world = distributed.current()
    if world.size > 1 and device.startswith("cuda") and m.device_map is None:
        device = f"cuda:{world.local_rank}"  # one model per process, each on its own GPU
    _check_device(loaded, loc, device)
    try:
        check_device_map(m.device_map)
    except DeviceMapError as e:  # before loading: named by the map's own key
        raise _device_map_error(loaded, loc, e) from None
    if m.remote:
        _check_remote(loaded, loc, m)
    return device


def model_error(loaded: LoadedPlan, name: str, e: EmbedLensError):
    """A loader's error (an unknown source or adapter, a config no adapter takes) at the model entry's key."""
    m: ModelSpec = loaded.plan.model_specs()[name]
    loc = _model_loc(loaded, name)
    if isinstance(e, ProcessorOptionError):
        return loaded.error((*loc, "processor_kwargs", *([e.key] if e.key else [])), e.detail)
    msg = str(e)
    for key in ("quantization", "device_map", "max_memory", "remote"):
        if msg.startswith(f"model.{key}"):
            sub = msg.split(":", 1)[0].split(".")[1:]
            return loaded.error((*loc, *sub), msg.split(": ", 1)[1])
    key = "adapter" if m.adapter and "adapter" in str(e) else "source"
    return loaded.error((*loc, key), msg)


def _check_remote(loaded: LoadedPlan, loc: tuple, m: ModelSpec) -> None:
    """What a remote model (NDIF) can do, checked before anything loads: probe passes only, a hub checkpoint."""
    key = ".".join(str(k) for k in loc)
    plan = loaded.plan
    if plan.conditions:
        cname, items = next(iter(plan.conditions.items()))
        raise loaded.error(("conditions", cname, 0), f"{items[0].name} (condition {cname!r}) runs the intervention engine, which "
                           f"runs locally only; {key}.remote: true runs probe passes on NDIF. Run the conditions in a plan "
                           "without remote (on a model you host), or drop them from this one")
    if m.source.startswith(("zoo:", "tiny:")) or Path(m.source).exists():
        raise loaded.error((*loc, "remote"), f"NDIF runs hub checkpoints; {m.source!r} is not a hub id (e.g. llava-hf/llava-1.5-7b-hf)")


def _device_map_error(loaded: LoadedPlan, loc: tuple, e: DeviceMapError):
    """A `DeviceMapError` at its key in the plan (``model.device_map.<module path>``, with the path quoted as written)."""
    if not e.key:  # the map as a whole, or '' (the whole model): the device_map key itself
        return loaded.error((*loc, "device_map"), e.reason if e.key is None else f"module '' (the whole model): {e.reason}")
    return loaded.error((*loc, "device_map", e.key), f"module {e.key!r}: {e.reason}")


def _check_device(loaded: LoadedPlan, loc: tuple, device: str) -> None:
    """An unknown or unavailable device is a plan error, not a traceback from the first tensor moved there."""
    if device == "cpu":  # always there: no torch import to tell (validate stays light)
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise loaded.error((*loc, "device"), f"not a device: {device!r} ({e}); expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise loaded.error((*loc, "device"), f"{device!r} is not available here ({n} CUDA device(s)); use cpu or an available device")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise loaded.error((*loc, "device"), "'mps' is not available here; use cpu")
    elif dev.type == "meta":
        raise loaded.error((*loc, "device"), "'meta' holds no weights (shapes only), so nothing can run on it; expected cpu, cuda, cuda:N or mps")
    elif dev.type not in ("cpu", "cuda", "mps") and not hasattr(torch, dev.type):
        raise loaded.error((*loc, "device"), f"{device!r} is not a device this torch supports")


def read_data(loaded: LoadedPlan, adapter: Adapter | None = None) -> list[Record]:
    """The plan's samples as records (images not decoded yet), checked record by record.

    Raises:
        PlanError: pointing at the data key, with the file and line of the bad record.
    """
    data = loaded.plan.data
    try:
        if data.prompts is not None:
            key = "prompts"
            records = read_records(loaded.resolve(data.prompts), loaded.resolve(data.images) if data.images else None)
        elif data.dataset is not None:
            key = "dataset"
            records = read_hf_dataset(loaded.resolve(data.dataset), data.split, data.columns)
        elif data.synthetic_video is not None:
            from embedlens.synthetic_video import SyntheticVideoSpec, make_video_records

            key = "synthetic_video"
            syn = data.synthetic_video.model_dump()
            syn["question_types"] = tuple(syn["question_types"])
            records = make_video_records(SyntheticVideoSpec(**syn))
        else:
            from embedlens.synthetic import SyntheticSpec, make_records

            key = "synthetic"
            syn = data.synthetic.model_dump()
            if syn["patch_grid"] == "auto":
                if adapter is None:
                    syn["patch_grid"] = 8
                else:
                    syn["patch_grid"] = adapter.grid()[0]
            syn["question_types"] = tuple(syn["question_types"])
            records = make_records(SyntheticSpec(**syn))
    except EmbedLensError as e:
        raise loaded.error(("data", key), str(e)) from None
    if data.limit is not None:
        records = records[: data.limit]
    return records


def _check_video(loaded: LoadedPlan, adapter, records: list[Record], key: tuple, unchecked: list) -> None:
    """Refuse video samples for a family that takes none, before any batch (a run met them at their batch)."""
    from embedlens.adapters.capabilities import Capability

    first = next((r for r in records if r.video is not None), None)
    if first is None:
        return
    try:
        takes = adapter.has(Capability.VIDEO)
    except NeedsModel:  # a third-party adapter: its class says, once loaded
        unchecked.append((".".join(key), "whether the model takes the samples' videos"))
        return
    if not takes:
        from embedlens.plugin_index import read_index

        video = [r["name"] for r in read_index().get("adapters", []) if Capability.VIDEO.value in r.get("capabilities", ())]
        raise loaded.error(key, f"{first.where}: sample {first.id!r} has a video; {adapter.name} does not take video in "
                                f"embedlens (families that do: {', '.join(video)})")


def prepare(loaded: LoadedPlan, adapter: Adapter | None = None, model: str | None = None, run_dir: Path | None = None) -> Prepared:
    """Load model and data and build the plugins; run the checks that need the model.

    Args:
        loaded: from `load_plan`.
        adapter: an already loaded model (skips loading `model`), or a weightless
            `embedlens.plan.architecture.ConfigAdapter` (`embedlens validate`): a check that asks it for
            what only the model has is listed in ``Prepared.unchecked`` instead of made.
        model: which of the plan's `models` (default: the first).
        run_dir: the run folder (claimed), for modules a device map offloads to ``disk``.

    Raises:
        PlanError: naming the plan file, line and key (e.g. a layer out of range).
    """
    plan = loaded.plan
    name = model or next(iter(plan.model_specs()))
    if adapter is None:
        name, adapter = load_plan_model(loaded, name, run_dir)
    unchecked: list[tuple[str, str]] = []  # stays empty with a loaded model: only a ConfigAdapter raises NeedsModel
    built: list[tuple[str, Probe]] = []
    for i, spec in enumerate(plan.probes):
        try:
            probe = probe_registry.get(spec.name)(**spec.params)
            probe.check(adapter)
        except NeedsModel as e:
            unchecked.append((f"probes[{i}] ({spec.name})", needs(e)))
        except EmbedLensError as e:
            msg = str(e)
            key = next((k for k in spec.params if msg.startswith(f"{spec.name}.{k}")), None)
            loc = ("probes", i, "params", key) if key else ("probes", i)
            raise loaded.error(loc, msg.split(": ", 1)[-1] if key else msg) from None
        built.append((spec.label or spec.name, probe))
    conditions = []
    for cname, items in plan.conditions.items():
        ivs = []
        for i, spec in enumerate(items):
            try:
                iv = intervention_registry.get(spec.name)(**spec.params)
                iv.check(adapter)
            except NeedsModel as e:
                unchecked.append((f"conditions.{cname}[{i}] ({spec.name})", needs(e)))
            except EmbedLensError as e:
                raise _plugin_error(loaded, ("conditions", cname, i), spec, e, f"condition {cname!r} ({spec.name}): ") from None
            ivs.append(iv)
        conditions.append(Condition(cname, ivs))
    metrics = []
    for i, spec in enumerate(plan.metrics):
        try:
            metrics.append(metric_registry.get(spec.name)(**spec.params))
        except EmbedLensError as e:
            raise _plugin_error(loaded, ("metrics", i), spec, e) from None
    partition = None
    if plan.partition is not None:
        try:
            partition = Partition(**plan.partition.model_dump())
            partition.check(adapter)
        except NeedsModel as e:
            unchecked.append(("partition", needs(e)))
        except ParameterError as e:  # keyed where raised: partition.anchors.dead
            raise loaded.error(("partition", *e.key.split(".")) if e.key else ("partition",), e.detail) from None
        except EmbedLensError as e:
            raise loaded.error(("partition",), str(e)) from None
    for i, (_, probe) in enumerate(built):  # one partition per plan (see loader._one_partition): token_partition
        if partition is not None and hasattr(probe, "use_partition"):  # labels with it, anchor_discovery reports its discovery
            try:
                probe.use_partition(partition)
            except EmbedLensError as e:
                raise _plugin_error(loaded, ("probes", i), plan.probes[i], e) from None
    own = [i for i, spec in enumerate(plan.probes) if spec.name == "anchor_discovery"]
    if not (partition is not None and partition.discover) and len({repr(sorted(plan.probes[i].params.items())) for i in own}) > 1:
        raise loaded.error(("probes", own[-1]), "a run has one anchor discovery: give the anchor_discovery probes the same "
                           "parameters, or set them once in a partition: block with discover: true")
    try:
        records = read_data(loaded, adapter)
    except NeedsModel as e:  # synthetic images sized to the model's patch grid, which only the processor knows here
        unchecked.append(("data.synthetic.patch_grid", "the processor's patch grid, which sizes the synthetic images"))
        records = read_data(loaded, None)
    breakdown_fields(loaded, records)  # report.breakdown names fields the samples have
    key = ("data", next(k for k in ("prompts", "dataset", "synthetic", "synthetic_video") if getattr(plan.data, k) is not None))
    _check_video(loaded, adapter, records, key, unchecked)
    try:
        for r in records:  # prompt checks are cheap: fail before the first batch, not in the middle
            try:
                adapter.prompt(Sample([None] * len(r.images), r.question, r.prompt, r.answer, r.id, r.meta))
            except EmbedLensError as e:
                raise loaded.error(key, f"{r.where}: {e}") from None
    except NeedsModel as e:
        unchecked.append((".".join(key), "each sample's prompt, rendered by the processor (its chat template and image placeholder)"))
    return Prepared(loaded, adapter, built, records, conditions, metrics, partition, name, unchecked)


def _plugin_error(loaded: LoadedPlan, loc: tuple, spec, err: EmbedLensError, prefix: str = ""):
    """Point a plugin's error at the parameter it names (``"key: ..."``), else at the entry."""
    msg = str(err)
    key = next((k for k in spec.params if msg.startswith(f"{k}:")), None)
    if key:
        return loaded.error((*loc, "params", key), prefix + msg.split(": ", 1)[1])
    return loaded.error(loc, prefix + msg)


def plan_hash(loaded: LoadedPlan) -> str:
    """Hash of the validated (sweep-expanded) plan: what a resumed run must match."""
    return hashlib.sha256(loaded.plan.model_dump_json().encode()).hexdigest()[:16]
