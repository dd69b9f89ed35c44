"""The model-source contract: a `Source` resolves the name after its prefix to a loaded model.

The built-in resolvers (hub folder or id, NDIF, ``zoo:``, ``tiny:``) live in
`embedlens.sources` and are registered in `embedlens.registry.sources`; this
module holds only what `load_model` needs to pick one, so the adapters import
neither the zoo nor the tiny models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from embedlens.errors import AdapterError
from embedlens.registry import sources

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter
    from embedlens.adapters.placement import Placement


class Source(ABC):
    """A kind of model source: turns the name after its prefix into a loaded, wrapped model.

    Attributes:
        prefixed: named as ``PREFIX:NAME`` (False for the hub and NDIF
            sources, which take every other string).
        remote_ok: can run on NDIF (``model.remote``).
    """

    prefixed: ClassVar[bool] = True
    remote_ok: ClassVar[bool] = False

    @abstractmethod
    def load(
        self,
        name: str,
        *,
        adapter: str | None,
        dtype: str,
        device: str,
        attn_implementation: str | None,
        placement: "Placement | None",
    ) -> "Adapter":
        """The model `name` names in this source, wrapped in its adapter (`adapter` forces one)."""


def resolve(source: str, remote: bool = False) -> tuple[type[Source], str]:
    """The resolver for `source` and the name it is given.

    Raises:
        AdapterError: `remote` with a prefixed source that NDIF cannot run.
        PluginError: the prefix names a plugin's source that failed to load.
    """
    prefix, sep, name = source.partition(":")
    if sep and prefix in sources.failed:
        sources.get(prefix)  # a plugin's source that failed to load: PluginError with its error, not a hub look-up
    if sep and prefix in sources and sources.get(prefix).prefixed:
        cls = sources.get(prefix)
        if remote and not cls.remote_ok:
            raise AdapterError(f"model.remote: NDIF runs hub checkpoints; {source!r} is not a hub id (e.g. llava-hf/llava-1.5-7b-hf)")
        return cls, name
    return sources.get("remote" if remote else "hub"), source
