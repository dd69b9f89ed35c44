"""Plugin state as data: `state_dict()` / `load_state_dict()` and their encoding as JSON plus safetensors.

A checkpoint must never be able to run code when it is read (pickle can), so
the running state of probes, interventions, conditions, the partition and the
effect summary is written as plain data: JSON for values (floats written with
``repr``, so they round-trip exactly; NaN and infinities spelled out) and
safetensors for tensors (bit-exact). Objects are never rebuilt from a class
named in the file: on resume the runner builds every plugin from the plan, as
for a fresh run, and then loads the saved state into it.

`Stateful` gives the default contract: `state_dict` returns the instance's
attributes, `load_state_dict` sets them back. It works when those attributes
are plain data: tensors, numpy arrays and scalars, ``None``, bools, ints,
floats, strings, lists, tuples, sets and dicts of those, `torch.Generator`s,
and nested objects that have `state_dict` / `load_state_dict` themselves (and
already exist in the freshly built plugin). A plugin that keeps anything else
(a fitted scikit-learn model, a file handle, a lambda) overrides both methods
and says how to turn it into such data; otherwise saving it fails with a
`CheckpointError` naming the plugin and the attribute.

Example:
    >>> import torch
    >>> class Counter(Stateful):
    ...     def __init__(self):
    ...         self.n, self.total = 0, torch.zeros(2)
    >>> c = Counter(); c.n, c.total = 3, torch.tensor([0.1, float("nan")])
    >>> meta, tensors = encode_state(c, "probe 'counter'")
    >>> fresh = Counter(); decode_state(fresh, meta, tensors, "probe 'counter'")
    >>> fresh.n, bool(torch.equal(fresh.total[:1], c.total[:1])), bool(fresh.total[1].isnan())
    (3, True, True)
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import TYPE_CHECKING, Any

from embedlens.errors import EmbedLensError

if TYPE_CHECKING:  # torch is imported where a value is encoded: `Site` (a value type) stays importable without it
    import torch


class CheckpointError(EmbedLensError):
    """A plugin's state that cannot be saved as data, or a checkpoint that does not fit the plan."""


#: Frozen dataclasses with plain fields that a checkpoint may rebuild by name (embedlens's own value types).
_VALUE_TYPES: dict[str, type] = {}


#: Embedlens's own helper classes (reservoirs, histograms) that plugins create while they run: a checkpoint may
#: make a blank one by name and load its state. Third-party classes are never made from a checkpoint.
_REBUILDABLE: dict[str, type] = {}


def rebuildable(cls: type) -> type:
    """Register a `Stateful` helper class whose instances a checkpoint may create blank and then load."""
    if not issubclass(cls, Stateful):
        raise TypeError(f"{cls.__qualname__}: only Stateful classes can be rebuilt from a checkpoint")
    _REBUILDABLE[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def value_type(cls: type) -> type:
    """Register a frozen dataclass of plain fields (e.g. `Site`) as a value a checkpoint may rebuild."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__qualname__}: only frozen dataclasses can be checkpoint value types")
    _VALUE_TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


class Stateful:
    """The state contract of plugins: `state_dict` and `load_state_dict` over plain data.

    The default saves every instance attribute (`vars`); see the module docstring
    for what an attribute may hold. Override both methods together when a
    plugin keeps something else.
    """

    def state_dict(self) -> dict[str, Any]:
        """The running state as plain data (tensors allowed); checked when it is encoded."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the state back on an instance built from the same parameters.

        Nested objects (values that are `_Nested`) are loaded into the objects
        this instance already holds, never created from the file.
        """
        for key, value in state.items():
            setattr(self, key, restore(getattr(self, key, None), value, f"{type(self).__name__}.{key}"))


@dataclasses.dataclass
class _Nested:
    """A nested object's state read from a checkpoint: loaded into the live object, never constructed."""

    cls: str
    state: Any


#: ``defaultdict`` factories a checkpoint may name (builtins only: no callable comes from a file).
_FACTORIES: dict[str, type] = {"defaultdict:list": list, "defaultdict:int": int, "defaultdict:float": float,
                               "defaultdict:dict": dict, "defaultdict:set": set}


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _float(v: float) -> Any:
    if math.isfinite(v):
        return v  # json writes repr(v): the shortest text that reads back as the same double
    return {"$float": "nan" if v != v else ("inf" if v > 0 else "-inf")}


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str, owner: str, depth: int = 0) -> Any:
    import numpy as np
    import torch

    if depth > 64:
        raise CheckpointError(f"{owner}: attribute {path!r} is nested more than 64 levels deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.integer):
        return value
    if isinstance(value, float) and not isinstance(value, np.floating):
        return _float(value)
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key, "device": str(value.device), "grad": bool(value.requires_grad)}
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf" or arr.dtype.byteorder == ">":
            raise CheckpointError(f"{owner}: attribute {path!r} is a numpy array of dtype {arr.dtype}; only bool, int and float arrays are saved")
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr).copy())
        return {"$ndarray": key, "scalar": isinstance(value, np.generic)}
    if isinstance(value, torch.Generator):
        key = f"t{len(tensors)}"
        tensors[key] = value.get_state()
        return {"$generator": key, "device": str(value.device)}
    if type(value) is list:
        return [_encode(v, tensors, f"{path}[{i}]", owner, depth + 1) for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"$tuple": [_encode(v, tensors, f"{path}[{i}]", owner, depth + 1) for i, v in enumerate(value)]}
    if type(value) in (set, frozenset):
        items = sorted(value, key=repr)
        return {"$set": [_encode(v, tensors, f"{path}{{}}", owner, depth + 1) for v in items]}
    if type(value) in (collections.Counter, collections.OrderedDict) or (
        type(value) is collections.defaultdict and value.default_factory in _FACTORIES.values()
    ):
        kind = {collections.Counter: "counter", collections.OrderedDict: "ordered"}.get(type(value))
        if kind is None:
            kind = next(k for k, f in _FACTORIES.items() if f is value.default_factory)
        return {"$mapping": kind, "items": _encode(dict(value), tensors, path, owner, depth + 1)}
    if type(value) is dict:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}", owner, depth + 1) for k, v in value.items()}
        return {"$dict": [[_encode(k, tensors, f"{path}<key>", owner, depth + 1), _encode(v, tensors, f"{path}[{k!r}]", owner, depth + 1)]
                          for k, v in value.items()]}
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        try:
            inner = value.state_dict()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a plugin's own state_dict failing is named, not a traceback
            raise CheckpointError(f"{owner}: attribute {path!r} ({type(value).__name__}): state_dict() failed: {type(e).__name__}: {e}") from None
        return {"$obj": _qualname(value), "state": _encode(inner, tensors, path, owner, depth + 1)}
    if _qualname(value) in _VALUE_TYPES:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"$value": _qualname(value), "fields": _encode(fields, tensors, path, owner, depth + 1)}
    raise CheckpointError(
        f"{owner}: attribute {path!r} holds a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot "
        "store as data (tensors, arrays, numbers, strings, lists and dicts of them, or objects with state_dict()); "
        "give the plugin state_dict() and load_state_dict() that turn it into such data (see docs/security.md)"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    import torch

    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) >= 1 and next(iter(value)).startswith("$"):
        tag = next(iter(value))
        try:
            if tag == "$float":
                return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[value["$float"]]
            if tag == "$tensor":
                t = tensors[value["$tensor"]]
                dev = str(value.get("device", "cpu"))
                if dev != "cpu":
                    try:
                        t = t.to(dev)
                    except (RuntimeError, AssertionError):
                        pass  # resumed on a machine without that device: the caller's model device decides later
                return t.requires_grad_(True) if value.get("grad") and t.is_floating_point() else t
            if tag == "$ndarray":
                arr = tensors[value["$ndarray"]].numpy()
                return arr[()] if value.get("scalar") else arr
            if tag == "$generator":
                g = torch.Generator(device=str(value.get("device", "cpu")))
                g.set_state(tensors[value["$generator"]])
                return g
            if tag == "$tuple":
                return tuple(_decode(v, tensors, where) for v in value["$tuple"])
            if tag == "$set":
                return {_decode(v, tensors, where) for v in value["$set"]}
            if tag == "$dict":
                return {_hashable(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in value["$dict"]}
            if tag == "$mapping":
                items = _decode(value["items"], tensors, where)
                kind = value["$mapping"]
                if kind == "counter":
                    return collections.Counter(items)
                if kind == "ordered":
                    return collections.OrderedDict(items)
                return collections.defaultdict(_FACTORIES[kind], items)
            if tag == "$obj":
                return _Nested(str(value["$obj"]), _decode(value["state"], tensors, where))
            if tag == "$value":
                cls = _VALUE_TYPES.get(str(value["$value"]))
                if cls is None:
                    raise CheckpointError(f"{where}: value type {value['$value']!r} is not one a checkpoint may rebuild")
                return cls(**_decode(value["fields"], tensors, where))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{where}: malformed {tag} entry in the checkpoint ({type(e).__name__}: {e})") from None
        raise CheckpointError(f"{where}: unknown entry {tag!r} in the checkpoint")
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(_hashable(x) for x in k)
    if isinstance(k, set):
        return frozenset(k)
    return k


def restore(current: Any, value: Any, path: str) -> Any:
    """The value to set for an attribute: `value`, with nested states loaded into the objects `current` holds."""
    if isinstance(value, _Nested):
        if current is None and value.cls in _REBUILDABLE:
            current = object.__new__(_REBUILDABLE[value.cls])
        if current is None or _qualname(current) != value.cls or not callable(getattr(current, "load_state_dict", None)):
            got = "nothing" if current is None else _qualname(current)
            raise CheckpointError(
                f"{path}: the checkpoint holds the state of a {value.cls}, but the plugin built from the plan holds {got}; "
                "a plugin that creates objects while it runs must rebuild them in its own load_state_dict()"
            )
        current.load_state_dict(value.state)
        return current
    if isinstance(value, list) and _has_nested(value):
        if current is None or (isinstance(current, list) and not current):
            current = [None] * len(value)
        if not isinstance(current, list) or len(current) != len(value):
            raise CheckpointError(f"{path}: the checkpoint holds {len(value)} nested objects; the plugin built from the plan holds a different list")
        return [restore(c, v, f"{path}[{i}]") for i, (c, v) in enumerate(zip(current, value))]
    if isinstance(value, dict) and _has_nested(value):
        if current is None:
            current = {}
        if not isinstance(current, dict):
            raise CheckpointError(f"{path}: the checkpoint holds a dict of nested objects; the plugin built from the plan holds {type(current).__name__}")
        return {k: restore(current.get(k), v, f"{path}[{k!r}]") for k, v in value.items()}
    return value


def _has_nested(value: Any) -> bool:
    if isinstance(value, _Nested):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_nested(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nested(v) for v in value.values())
    return False


def encode_state(obj: Any, owner: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_value, tensors)`` for ``obj.state_dict()``; tensors keyed by the names the JSON refers to.

    Raises:
        CheckpointError: naming `owner` (e.g. ``"probe 'lens' (EmbeddingLens)"``) and the attribute that is not data.
    """
    tensors: dict[str, torch.Tensor] = {}
    return {"$obj": _qualname(obj), "state": _encode(_call_state(obj, owner), tensors, "", owner)}, tensors


def _call_state(obj: Any, owner: str) -> Any:
    try:
        return obj.state_dict()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{owner}: state_dict() failed: {type(e).__name__}: {e}") from None


def encode_value(value: Any, tensors: dict[str, torch.Tensor], owner: str) -> Any:
    """Encode a plain value (adding its tensors to `tensors`); see `encode_state`."""
    return _encode(value, tensors, "", owner)


def decode_value(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of `encode_value`."""
    return _decode(value, tensors, where)


def decode_state(obj: Any, encoded: Any, tensors: dict[str, torch.Tensor], owner: str) -> None:
    """Load what `encode_state` wrote into `obj`, a fresh instance built from the same parameters.

    Raises:
        CheckpointError: the saved state is not of `obj`'s class or does not fit it.
    """
    value = _decode(encoded, tensors, owner)
    if not isinstance(value, _Nested):
        raise CheckpointError(f"{owner}: the checkpoint holds no object state here")
    restore(obj, value, owner)
