"""``model.processor_kwargs``: the image-processor settings a plan may change, per family, checked.

A family declares what its processor lets a plan change in `Adapter.processor_options`: plan key ->
(the image processor's attribute, with ``size.X`` for a key of its ``size``; the value's type). Qwen-VL's
``min_pixels`` / ``max_pixels`` bound the pixels an image is resized to (so its visual tokens: one per
28 x 28 pixels on Qwen2/2.5-VL), InternVL's ``max_dynamic_patch`` the tiles an image is cut into
(each 256 tokens, plus the thumbnail). Settings are applied to the loaded processor, which is what
the processor reads on every call, so `encode` and `Adapter.grid` follow them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Mapping

from embedlens.errors import AdapterError

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter

#: The types a processor setting may have (what the plan schema lets through).
VALUE_TYPES = (bool, int, float, str)


class ProcessorOptionError(AdapterError):
    """A ``processor_kwargs`` entry the family's processor does not take; `key` is the entry (``""``: the whole)."""

    def __init__(self, key: str, detail: str):
        self.key, self.detail = key, detail
        super().__init__(f"model.processor_kwargs{'.' + key if key else ''}: {detail}")


def _type_name(t: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, t.__name__)


def check_processor_kwargs(adapter_cls: "type[Adapter]", options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` checked against the family's `processor_options`: keys, value types, ranges.

    Returns:
        ``{processor attribute path: value}``.

    Raises:
        ProcessorOptionError: naming the key, what the family takes and what was given.

    Example:
        >>> from embedlens.adapters.qwen_vl import Qwen2_5_VLAdapter
        >>> check_processor_kwargs(Qwen2_5_VLAdapter, {"max_pixels": 200704})
        {'size.longest_edge': 200704}
        >>> check_processor_kwargs(Qwen2_5_VLAdapter, {"max_pixel": 200704})
        Traceback (most recent call last):
        ...
        embedlens.adapters.processor_options.ProcessorOptionError: model.processor_kwargs.max_pixel: qwen2_5_vl's processor does not take it. Did you mean: max_pixels? It takes: max_pixels, min_pixels
    """
    known = adapter_cls.processor_options
    family = adapter_cls.registered_name or adapter_cls.__name__
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            takes = f"It takes: {', '.join(sorted(known))}" if known else "It takes none (this family's visual tokens have a fixed count per image)"
            raise ProcessorOptionError(str(key), f"{family}'s processor does not take it.{hint} {takes}")
        attr, kind = known[key]
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise ProcessorOptionError(key, f"expected {_type_name(kind)}; got {value!r}")
        if kind in (int, float) and value < 1:
            raise ProcessorOptionError(key, f"expected at least 1; got {value!r}")
        if attr in out:
            other = next(k for k in options if k != key and known.get(k, ("",))[0] == attr)
            raise ProcessorOptionError(key, f"sets the same setting as {other} ({attr}); give one of them")
        out[attr] = value
    return out


def configure_processor(adapter: "Adapter", options: Mapping[str, Any]) -> None:
    """Apply checked `options` to the adapter's image processor (what its calls read as their defaults).

    Raises:
        ProcessorOptionError: as `check_processor_kwargs`, or a pair of bounds the wrong way round.
    """
    settings = check_processor_kwargs(type(adapter), options)
    if not settings:
        return
    ip = adapter.processor.image_processor
    size = {k: v for k, v in settings.items() if k.startswith("size.")}
    for attr, value in settings.items():
        if not attr.startswith("size."):
            setattr(ip, attr, value)
    if size:
        new = {k.split(".", 1)[1]: v for k, v in size.items()}
        old = ip.size
        ip.size = dataclasses.replace(old, **new) if dataclasses.is_dataclass(old) else {**dict(old), **new}
    _check_bounds(adapter, options)


def _check_bounds(adapter: "Adapter", options: Mapping[str, Any]) -> None:
    """The lower bound of each declared (min, max) pair at most its upper bound, as the processor now holds them."""
    ip = adapter.processor.image_processor
    known = type(adapter).processor_options

    def read(attr: str):
        if attr.startswith("size."):
            size = ip.size
            key = attr.split(".", 1)[1]
            return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return getattr(ip, attr, None)

    for key, (attr, _) in known.items():
        if not key.startswith("min_"):
            continue
        upper = next((k for k in known if k == "max_" + key[4:]), None)
        if upper is None:
            continue
        lo, hi = read(attr), read(known[upper][0])
        if lo is not None and hi is not None and lo > hi:
            named = key if key in options else upper
            raise ProcessorOptionError(named, f"{key} ({lo}) is above {upper} ({hi}); the processor needs {key} <= {upper}")
