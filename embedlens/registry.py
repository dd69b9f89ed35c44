"""Plugin registries: one `Registry[T]` per plugin kind.

Plugins register where they are defined, under the name plans use::

    @probes.register("embedding_lens")
    class EmbeddingLens(Probe): ...

Third-party packages add plugins through entry-point groups
(``embedlens.probes``, ``embedlens.interventions``, ``embedlens.adapters``,
``embedlens.metrics``, ``embedlens.sources``); each entry point names a module or object whose import
registers the plugin. They load lazily, on the first lookup or listing, and a
plugin that fails to load is kept with its error for `embedlens list`. A look-up of
a built-in name imports that plugin's module alone (found in the stored index,
`embedlens.plugin_index`), so checking a plan imports only the plugins it names.

Example:
    >>> class Base: pass
    >>> reg = Registry("widget", Base)
    >>> @reg.register("knob")
    ... class Knob(Base):
    ...     '''Turns.'''
    >>> reg.get("knob") is Knob
    True
    >>> reg.get("nob")
    Traceback (most recent call last):
    ...
    embedlens.errors.UnknownNameError: Unknown widget 'nob'. Did you mean: knob? Available: knob
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from embedlens.errors import PluginError, UnknownNameError

T = TypeVar("T")

#: The stored description of the built-in plugins (`embedlens.plugin_index` writes and reads it): each one's module.
BUILTIN_INDEX = Path(__file__).resolve().parent / "resources" / "builtin_plugins.json"


@dataclass(frozen=True)
class Param:
    """One declared constructor parameter of a plugin."""

    name: str
    annotation: str
    default: object  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def __str__(self) -> str:
        s = f"{self.name}: {self.annotation}"
        return s if self.required else f"{s} = {self.default!r}"


def _init_params(cls: type) -> list[inspect.Parameter]:
    if cls.__init__ is object.__init__:  # no constructor of its own: no parameters
        return []
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


def plugin_params(cls: type) -> list[Param]:
    """The explicit constructor parameters of a plugin class, in order."""
    params = []
    for p in _init_params(cls):
        ann = p.annotation
        ann = ann if isinstance(ann, str) else str(ann).replace("typing.", "") if not isinstance(ann, type) else ann.__name__
        params.append(Param(p.name, ann, p.default))
    return params


def summary(obj: object) -> str:
    """First line of an object's docstring."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """Named plugins of one kind, with a base-class check and lazy entry points.

    Args:
        kind: singular noun used in messages ("probe").
        base: every plugin must subclass it; a ``"module:Class"`` string is
            imported on first use (the base classes' packages import this module).
        group: entry-point group to load third-party plugins from.
        required: methods a plugin must define (not inherit from `base` unchanged).
        builtins: module whose import registers the built-in plugins (or, where it holds a ``BUILTINS`` tuple,
            whose listed modules do); imported on the first listing, so ``import embedlens`` itself stays light.
        index: this kind's key in the stored built-in index (`embedlens.plugin_index`): a look-up of a
            name the index holds imports the module it names and nothing else (a name it no longer finds there
            falls back to every built-in and entry point).
    """

    def __init__(self, kind: str, base: "type | str", group: str | None = None, required: tuple[str, ...] = (),
                 builtins: str | None = None, index: str | None = None):
        self.kind = kind
        self._base = base
        self.group = group
        self.required = required
        self.builtins = builtins
        self.index = index
        self._modules: dict[str, str] | None = None  # built-in name -> its module, from the stored index
        self._items: dict[str, type] = {}
        self._failed: dict[str, str] = {}  # entry-point name -> error
        self._entry_points_loaded = group is None and builtins is None

    @property
    def base(self) -> type:
        if isinstance(self._base, str):
            module, _, attr = self._base.partition(":")
            self._base = getattr(importlib.import_module(module), attr)
        return self._base

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator registering a plugin under `name` (its key in plans)."""

        def deco(cls: type) -> type:
            self.add(name, cls)
            return cls

        return deco

    def add(self, name: str, cls: type) -> None:
        """Register `cls` under `name`, validating it first.

        Raises:
            PluginError: duplicate name, wrong base class, missing methods or
                parameters that are not explicit (``*args``/``**kwargs``).
        """
        where = f"{cls.__module__}.{cls.__qualname__}"
        if name in self._items and self._items[name] is not cls:
            other = self._items[name]
            raise PluginError(
                f"{self.kind} name {name!r} is already registered by {other.__module__}.{other.__qualname__}; "
                f"cannot register {where} under the same name"
            )
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"{where}: a {self.kind} must subclass {self.base.__module__}.{self.base.__qualname__}")
        for meth in self.required:
            fn = getattr(cls, meth, None)
            if fn is None or getattr(fn, "__isabstractmethod__", False):
                raise PluginError(f"{where}: a {self.kind} must define {meth}()")
        for p in _init_params(cls):
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise PluginError(
                    f"{where}: {self.kind} parameters must be explicit keyword arguments; found {p}"
                )
            if p.annotation is inspect.Parameter.empty:
                raise PluginError(f"{where}: parameter {p.name!r} needs a type annotation")
        cls.registered_name = name
        self._items[name] = cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        if self.builtins is not None:
            package = importlib.import_module(self.builtins)  # registers through the decorators (a no-op once imported)
            for module in getattr(package, "BUILTINS", ()):
                importlib.import_module(module)
        for ep in (metadata.entry_points(group=self.group) if self.group is not None else ()):
            if ep.name in self._items:
                continue
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not hide the others
                self._failed[ep.name] = f"{type(e).__name__}: {e} (entry point {ep.value})"
                continue
            if isinstance(obj, type) and ep.name not in self._items:
                try:
                    self.add(ep.name, obj)
                except PluginError as e:
                    self._failed[ep.name] = str(e)

    def get(self, name: str) -> type:
        """The plugin registered as `name`.

        Raises:
            UnknownNameError: with close matches and every available name; a
                plugin that failed to load is reported with its error.
        """
        if name not in self._items and name in self._builtin_modules():
            importlib.import_module(self._builtin_modules()[name])  # this plugin's module alone: registers it
        if name not in self._items:
            self._load_entry_points()
        if name in self._items:
            return self._items[name]
        if name in self._failed:
            raise PluginError(f"{self.kind} {name!r} failed to load: {self._failed[name]}")
        raise UnknownNameError.make(self.kind, name, self._items)

    def _builtin_modules(self) -> dict[str, str]:
        """``{name: module}`` of the built-ins the stored index holds for this kind (empty without an index)."""
        if self._modules is None:
            self._modules = {}
            if self.index is not None and self.builtins is not None:
                import json

                rows = json.loads(BUILTIN_INDEX.read_text(encoding="utf-8")).get(self.index, [])
                self._modules = {row["name"]: row["module"] for row in rows if "module" in row}
        return self._modules

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, type]]:
        self._load_entry_points()
        return sorted(self._items.items())

    @property
    def failed(self) -> dict[str, str]:
        """Entry points that failed to load, with their errors."""
        self._load_entry_points()
        return dict(self._failed)

    def fresh(self) -> "Registry[T]":
        """An empty registry of the same kind (for tests)."""
        return Registry(self.kind, self._base, self.group, self.required)  # no built-ins: empty until told


adapters: Registry = Registry(
    "adapter", "embedlens.adapters.base:Adapter", "embedlens.adapters", required=("image_layouts",),
    builtins="embedlens.adapters.families", index="adapters",
)
probes: Registry = Registry(
    "probe", "embedlens.probes.base:Probe", "embedlens.probes", required=("sites", "update", "result"),
    builtins="embedlens.probes", index="probes",
)
interventions: Registry = Registry(
    "intervention", "embedlens.interventions.base:Intervention", "embedlens.interventions", required=("setup",),
    builtins="embedlens.interventions", index="interventions",
)
metrics: Registry = Registry("metric", "embedlens.metrics:Metric", "embedlens.metrics", required=("compute",),
                             builtins="embedlens.metrics", index="metrics")
#: Model sources (``tiny:``, ``zoo:``, a hub folder or id, NDIF): `embedlens.sources`. Not a plan plugin
#: kind, so not in `REGISTRIES` (whose kinds `embedlens list` and the plan reference show).
sources: Registry = Registry("model source", "embedlens.adapters.sources:Source", "embedlens.sources", required=("load",),
                             builtins="embedlens.sources")
REGISTRIES: dict[str, Registry] = {
    "adapters": adapters,
    "probes": probes,
    "interventions": interventions,
    "metrics": metrics,
}
