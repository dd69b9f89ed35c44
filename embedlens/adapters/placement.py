"""Where a model's modules sit: one device, spread over several (accelerate's device maps), offloaded, quantised.

`Placement` is what a plan's ``model`` section asks for beyond one ``device``;
`loading_kwargs` turns it into `from_pretrained` arguments and `place` applies
it to a model built in code (``tiny:`` models) with accelerate's own
`dispatch_model`, so both kinds of source run the same hook machinery
(`accelerate.hooks.AlignDevicesHook`) a multi-GPU split runs.

Code that reduces tensors asks a module where it runs (`module_device`) rather
than assuming the model has one device, and reads a weight that may be
offloaded through `weight` (a module mapped to ``cpu``/``disk`` under a device
map keeps its parameters on the ``meta`` device; accelerate's hook holds the
real values and loads them for each forward).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedlens.errors import AdapterError

#: The device-map strategies accelerate computes itself (`infer_auto_device_map`).
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """How to place a model over devices (see the module docstring).

    Args:
        device_map: a strategy name (`STRATEGIES`) or ``{module path: device}`` where a
            device is a GPU index, ``"cuda:N"``, ``"cpu"`` or ``"disk"``; None: one device.
        max_memory: ``{device: bytes or "20GiB"}`` for the strategies.
        offload_dir: the folder (inside the run folder) for modules mapped to ``"disk"``.
        quantization: `transformers.BitsAndBytesConfig` arguments.
    """

    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_dir: Path | None = None
    quantization: dict[str, Any] | None = None

    @property
    def spread(self) -> bool:
        """True when modules may sit on different devices (a device map is given)."""
        return self.device_map is not None

    def needs_disk(self) -> bool:
        return isinstance(self.device_map, dict) and "disk" in {str(v) for v in self.device_map.values()}


class DeviceMapError(AdapterError):
    """A device map entry that cannot work; `key` is the module path (None: the map as a whole)."""

    def __init__(self, key: str | None, reason: str):
        self.key, self.reason = key, reason
        where = "model.device_map" if key is None else f"model.device_map[{key!r}]"
        super().__init__(f"{where}: {reason}")


def check_device_map(device_map: str | dict[Any, Any] | None) -> None:
    """Refuse a device map no model can run under, before anything is loaded.

    Every value must be a device that holds weights and is present here (a GPU index
    or ``cuda:N`` below the number of GPUs, ``cpu``, ``mps`` where available, or
    ``disk``), and at least one module must run somewhere other than ``disk``
    (accelerate executes offloaded modules on a computing device; with none, the
    weights stay on ``meta`` and the first copy fails).

    Raises:
        DeviceMapError: naming the module path and the value.
    """
    if device_map is None or isinstance(device_map, str):
        return
    if not isinstance(device_map, dict) or not device_map:
        raise DeviceMapError(None, f"expected a strategy ({', '.join(STRATEGIES)}) or a non-empty mapping of module path -> "
                                   f"device; got {device_map!r}")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, dev in device_map.items():
        if not isinstance(key, str):
            raise DeviceMapError(str(key), f"a module path must be text (e.g. model.language_model, or '' for the whole model); got {key!r}")
        if isinstance(dev, bool) or not isinstance(dev, (int, str)):
            raise DeviceMapError(key, f"expected a GPU index, cuda:N, cpu or disk; got {dev!r}")
        if isinstance(dev, int) or dev == "cuda" or dev.startswith("cuda:"):
            index = dev if isinstance(dev, int) else (dev.split(":", 1)[1] if ":" in dev else "0")
            if not (isinstance(index, int) or index.isdigit()):
                raise DeviceMapError(key, f"not a device: {dev!r}; expected a GPU index, cuda:N, cpu or disk")
            if int(index) >= gpus or int(index) < 0:
                raise DeviceMapError(key, f"{dev!r}: GPU {index} is not available here ({gpus} CUDA device(s)); use cpu, disk or an available GPU")
        elif dev == "mps":
            if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise DeviceMapError(key, "'mps' is not available here; use cpu or disk")
        elif dev == "meta":
            raise DeviceMapError(key, "'meta' holds no weights (shapes only); expected a GPU index, cuda:N, cpu or disk")
        elif dev not in ("cpu", "disk"):
            raise DeviceMapError(key, f"not a device: {dev!r}; expected a GPU index, cuda:N, cpu or disk")
    if all(v == "disk" for v in device_map.values()):
        shown = next(iter(device_map))
        raise DeviceMapError(shown, "every module is mapped to 'disk', so nothing runs the model: map the whole model ('') or some "
                                    "modules to cpu or a GPU, and only the rest to disk")


def quantization_config(options: dict[str, Any]):
    """A `transformers.BitsAndBytesConfig` from a plan's ``model.quantization`` mapping.

    Raises:
        AdapterError: naming ``model.quantization`` (and the key) when a key is not one of
            `BitsAndBytesConfig`'s arguments, or when this installation cannot quantise
            (bitsandbytes missing, or no CUDA device).
    """
    import torch
    from transformers import BitsAndBytesConfig

    known = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    for key in options:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), known, n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise AdapterError(f"model.quantization.{key}: not a BitsAndBytesConfig argument.{hint} Known: {', '.join(known)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AdapterError(
            "model.quantization: quantised loading needs the bitsandbytes package, which is not installed here "
            "(pip install bitsandbytes, on a machine with a CUDA GPU); or remove model.quantization"
        ) from None
    if not torch.cuda.is_available():
        raise AdapterError("model.quantization: bitsandbytes quantisation needs a CUDA GPU and none is available here; "
                           "remove model.quantization to load in model.dtype")
    try:
        return BitsAndBytesConfig(**options)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"model.quantization: {e}") from None


def loading_kwargs(placement: Placement | None) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments for `placement` (empty for one device).

    Raises:
        AdapterError: quantisation this installation cannot do, or a device map with ``disk`` and no folder.
        DeviceMapError: a device map entry no model can run under (`check_device_map`).
    """
    if placement is None:
        return {}
    check_device_map(placement.device_map)
    out: dict[str, Any] = {}
    if placement.device_map is not None:
        out["device_map"] = dict(placement.device_map) if isinstance(placement.device_map, dict) else placement.device_map
        if placement.max_memory is not None:
            out["max_memory"] = dict(placement.max_memory)
        if placement.needs_disk():
            if placement.offload_dir is None:
                raise AdapterError("model.device_map: modules mapped to 'disk' need a run folder to offload to")
            out["offload_folder"] = str(placement.offload_dir)
    if placement.quantization is not None:
        out["quantization_config"] = quantization_config(placement.quantization)
    return out


def place(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Spread a model built in code as `from_pretrained(device_map=...)` would (accelerate's `dispatch_model`).

    Raises:
        AdapterError: naming ``model.device_map`` when a path is not a module of the model, or a module is left out.
    """
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:
        raise AdapterError("model.device_map: needs the accelerate package (pip install 'embedlens[scale]')") from None

    if placement.quantization is not None:
        raise AdapterError("model.quantization: only checkpoints loaded with from_pretrained can be quantised (not tiny: models)")
    check_device_map(placement.device_map)
    dm = placement.device_map
    if isinstance(dm, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = dict(placement.max_memory) if placement.max_memory else None
        if dm != "sequential":
            memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, low_zero=dm == "balanced_low_0")
        dm = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    names = dict(model.named_modules())
    for path in dm:
        if path and path not in names:
            raise DeviceMapError(path, f"not a module of {type(model).__name__}")
    covered = [n for n, _ in model.named_parameters() if not any(n == p or n.startswith(p + ".") or p == "" for p in dm)]
    if covered:
        raise AdapterError(f"model.device_map: no device for {covered[0]} (and {len(covered) - 1} more); map every module")
    if placement.needs_disk() and placement.offload_dir is None:
        raise AdapterError("model.device_map: modules mapped to 'disk' need a run folder to offload to")
    # as accelerate's own from_pretrained path: the first accelerator runs what is offloaded to cpu/disk
    main = next((d for d in dm.values() if str(d) not in ("cpu", "disk")), "cpu")
    model = dispatch_model(model, device_map=dm, main_device=main,
                           offload_dir=str(placement.offload_dir) if placement.offload_dir else None)
    model.hf_device_map = dict(dm)
    return model


def module_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else its first real parameter's device.

    A module mapped to ``cpu``/``disk`` offload keeps ``meta`` parameters; the
    hook moves the real weights to its execution device for each forward, so
    that is where its inputs must be and where its outputs appear.
    """
    import torch

    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        dev = _hook_device(hook)
        if dev is not None:
            return dev
        for p in m.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    for b in module.buffers():
        if b.device.type != "meta":
            return b.device
    return torch.device("cpu")


def _hook_device(hook) -> torch.device | None:
    import torch

    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return None


def weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter's values, also when accelerate offloaded it (the parameter itself is then on ``meta``).

    The offloaded copy is returned where the module computes (`module_device`).
    """
    p = getattr(module, name)
    if p.device.type != "meta":
        return p
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        wmap = getattr(h, "weights_map", None)
        if wmap is not None and name in wmap:
            return wmap[name].to(module_device(module))
    raise AdapterError(f"{type(module).__name__}.{name} is on the meta device and no offload hook holds its values")
