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
    >>> c = Counter(); c.n, c.total = 3, torch.tensor([0.1, -2.5])
    >>> meta, tensors = encode_state(c, "probe 'counter'")
    >>> fresh = Counter(); decode_state(fresh, meta, tensors, "probe 'counter'")
    >>> fresh.n, bool(torch.equal(fresh.total, c.total))
    (3, True)
    >>> meta["state"]["total"]["$tensor"] = "t1"; tensors["t1"] = torch.zeros(3)  # a checkpoint someone edited
    >>> decode_state(Counter(), meta, tensors, "probe 'counter'")
    Traceback (most recent call last):
    ...
    embedlens.state.CheckpointError: Counter.total: the checkpoint holds a torch.float32 tensor of shape [3]; expected a torch.float32 tensor of shape [2]
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

    #: Constructor parameters that a fit may change (e.g. a partition's discovered ``anchors``); every other
    #: parameter saved in a checkpoint must equal the value the plan gives the freshly built instance.
    fitted_params: tuple[str, ...] = ()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the state back on an instance built from the same parameters.

        The saved state is checked against this instance first (`check_state`): attribute names, the
        plan's parameters, kinds, dtypes, shapes and finiteness. Nested objects (values that are
        `_Nested`) are loaded into the objects this instance already holds, never created from the file.

        Raises:
            CheckpointError: naming the attribute and what is wrong with its saved value.
        """
        check_state(self, state, type(self).__name__)
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
                dev = _device(value.get("device", "cpu"), where)
                if dev != "cpu":
                    try:
                        t = t.to(dev)
                    except (RuntimeError, AssertionError):
                        pass  # resumed on a machine without that device: the caller's model device decides later
                # NaN is not refused here: a plugin may keep one as a placeholder; check_state refuses it where the
                # freshly built instance holds finite values, and a nested object's load_state_dict where it knows better
                return t.requires_grad_(True) if value.get("grad") and t.is_floating_point() else t
            if tag == "$ndarray":
                arr = tensors[value["$ndarray"]].numpy()
                return arr[()] if value.get("scalar") else arr
            if tag == "$generator":
                g = torch.Generator(device=_device(value.get("device", "cpu"), where))
                state = tensors[value["$generator"]]
                if state.dtype != torch.uint8 or state.dim() != 1:
                    raise CheckpointError(f"{where}: a random generator's state is a 1-d uint8 tensor; the checkpoint holds "
                                          f"{state.dtype} of shape {list(state.shape)}")
                g.set_state(state)
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


# -- checking what a checkpoint restores -------------------------------------------------------------------
#: How deep a checkpoint's JSON may nest (`encode_state` writes at most 64 attribute levels, a few JSON levels each).
MAX_JSON_DEPTH = 256


def json_depth(text: str) -> int:
    """The nesting depth of JSON `text`, counted without parsing it (a 100,000-deep document must not recurse).

    Example:
        >>> json_depth('{"a": [1, {"b": "[[["}]}')
        3
    """
    import re

    depth = deepest = 0
    for ch in re.sub(r'[^\[\]{}]', "", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)):  # strings hold no structure
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _device(value: Any, where: str) -> str:
    """A device a restored tensor may go to: cpu, cuda[:N] or mps (never ``meta``, which holds no values)."""
    import torch

    try:
        dev = torch.device(str(value))
    except (RuntimeError, ValueError, TypeError):
        raise CheckpointError(f"{where}: {value!r} is not a device") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CheckpointError(f"{where}: a tensor saved on device {str(value)!r}; a checkpoint's tensors live on cpu, cuda or mps")
    return str(dev)


def _params(obj: Any) -> list[str]:
    """The names `type(obj)`'s constructor takes (the plugin's parameters)."""
    import inspect

    try:
        sig = inspect.signature(type(obj))
    except (TypeError, ValueError):
        return []
    return [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _kind(v: Any) -> str:
    import numpy as np
    import torch

    if isinstance(v, torch.Tensor):
        return "tensor"
    if isinstance(v, np.ndarray):
        return "array"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(v, _Nested):
        return "object"
    for t, name in ((str, "str"), (list, "list"), (tuple, "tuple"), (dict, "dict"), ((set, frozenset), "set"), (torch.Generator, "generator")):
        if isinstance(v, t):
            return name
    return "object"


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (tensors by dtype, shape and bits; NaN equals NaN)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a.detach().cpu(), b.detach().cpu())))
    if _kind(a) != _kind(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a plain equality are compared by their own load_state_dict
        return True


def _show(v: Any) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {list(v.shape)}"
    if isinstance(v, _Nested):
        return f"the state of a {v.cls}"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _behaviour(cls: type, key: str) -> bool:
    """`cls` defines `key` as behaviour: a method, property or other descriptor, a nested class, a callable
    (a plain class-level default such as ``_chosen = None`` is data, which an instance may set)."""
    import inspect

    try:
        attr = inspect.getattr_static(cls, key)
    except AttributeError:
        return False
    return callable(attr) or hasattr(type(attr), "__get__")


def check_state(obj: Any, state: Any, where: str) -> None:
    """Check a restored state against `obj`, a fresh instance built from the plan, before anything is set.

    - the state is a mapping of attribute names: identifiers, no dunder names, none that would replace a
      method, property or other behaviour of `obj`'s class (``result``, ``update``, ``needs_fit``);
    - a constructor parameter (one the plan sets) equals the plan's value, unless the class lists it in
      ``fitted_params``;
    - an attribute the fresh instance already holds (not None) keeps its kind (a tensor stays a tensor, a
      number a number, a list a list ...); a non-empty tensor (a fixed-size accumulator) keeps its dtype and
      shape, and stays finite when it is finite fresh.

    Raises:
        CheckpointError: ``WHERE.ATTRIBUTE: what the checkpoint holds, what was expected``.
    """
    import dataclasses
    import inspect

    import torch

    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: the saved state is {_kind(state)} {_show(state)}; expected a mapping of attribute names")
    own = vars(obj) if hasattr(obj, "__dict__") else {}
    fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    params = set(_params(obj)) - set(getattr(type(obj), "fitted_params", ()))
    for key, value in state.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("__"):
            raise CheckpointError(f"{where}: the saved state names attribute {key!r}, which is not an attribute name a plugin keeps")
        if key not in own and key not in fields and _behaviour(type(obj), key):
            what = type(inspect.getattr_static(type(obj), key)).__name__
            raise CheckpointError(f"{where}: the saved state sets {key!r}, which would replace the {what} {type(obj).__name__}.{key}")
        if key not in own:
            continue  # made while the plugin ran (lazily): nothing fresh to compare with
        fresh = own[key]
        if key in params and not _has_nested(value) and not _same(fresh, value):
            raise CheckpointError(f"{where}.{key}: the checkpoint holds {_show(value)}; the plan gives {_show(fresh)}")
        if fresh is None or isinstance(value, _Nested) or _has_nested(value):
            continue
        if _kind(value) != _kind(fresh):
            raise CheckpointError(f"{where}.{key}: the checkpoint holds {_kind(value)} {_show(value)}; a {type(obj).__name__} keeps {_kind(fresh)} here")
        if isinstance(fresh, torch.Tensor) and fresh.numel():  # an empty one is a placeholder: it says nothing of what follows
            if value.dtype != fresh.dtype or value.shape != fresh.shape:
                raise CheckpointError(f"{where}.{key}: the checkpoint holds {_show(value)}; expected a {fresh.dtype} tensor of shape {list(fresh.shape)}")
            if value.is_floating_point() and bool(torch.isfinite(fresh).all()) and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{where}.{key}: the checkpoint holds NaN or infinite values where a run keeps finite ones")
