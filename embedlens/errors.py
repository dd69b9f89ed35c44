"""The exception hierarchy: everything embedlens raises on purpose is an `EmbedLensError`."""

from __future__ import annotations

import difflib
from typing import Iterable


class EmbedLensError(Exception):
    """Base class of every error embedlens raises about user input or state."""


class UnknownNameError(EmbedLensError, KeyError):
    """A plugin, adapter, site or model name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

    @classmethod
    def make(cls, kind: str, name: str, available: Iterable[str]) -> "UnknownNameError":
        """Build the error with close matches and the full list of names.

        Example:
            >>> str(UnknownNameError.make("probe", "embeding_lens", ["embedding_lens"]))
            "Unknown probe 'embeding_lens'. Did you mean: embedding_lens? Available: embedding_lens"
        """
        names = sorted(available)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        msg = f"Unknown {kind} {name!r}."
        if close:
            msg += f" Did you mean: {', '.join(close)}?"
        msg += f" Available: {', '.join(names) if names else '(none)'}"
        return cls(msg)


class PluginError(EmbedLensError):
    """A plugin that is malformed, registered twice, or failed to load."""


class AdapterError(EmbedLensError):
    """A model that no adapter supports, or a site the model does not have."""


class InputError(EmbedLensError):
    """Bad data: an unreadable image, a prompt without an image placeholder, ..."""


class PlanError(EmbedLensError):
    """A plan that does not validate; the message names file, line and key path."""


class InterventionError(EmbedLensError):
    """An intervention's parameters or selection do not fit the model or the batch."""


class ParameterError(InterventionError):
    """A parameter value that cannot work, keyed where it is raised (no message is parsed to find the key).

    Attributes:
        owner: what holds the parameter (``"partition"``; ``""`` when its holder names it).
        key: the parameter's path under `owner` (``"k"``, ``"anchors.dead"``; ``""``: the whole).
        detail: what is wrong and what was expected.
    """

    def __init__(self, owner: str, key: str, detail: str):
        self.owner, self.key, self.detail = owner, key, detail
        super().__init__(": ".join((".".join(p for p in (owner, key) if p) or owner, detail)))

    def moved(self, owner: str, key: str | None = None) -> "ParameterError":
        """The same error held by `owner` (under `key`, default the same key): a probe's copy of a partition."""
        return ParameterError(owner, self.key if key is None else key, self.detail)


class BenchmarkError(EmbedLensError):
    """The lmms-eval bridge: a model argument, a generation setting or a request it cannot honour."""
