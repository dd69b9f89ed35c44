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


class BenchmarkError(EmbedLensError):
    """The lmms-eval bridge: a model argument, a generation setting or a request it cannot honour."""
