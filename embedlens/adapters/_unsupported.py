"""The unsupported-architecture error, raised where a model fits no adapter (`adapter_for_architecture`) and where
an adapter's module paths do not find the parts of a model it was picked for (`Adapter.__init__`)."""

from __future__ import annotations

from embedlens.errors import AdapterError
from embedlens.registry import adapters

ADDING_A_FAMILY = "docs/adding-a-family.md"  # the guide the unsupported-architecture error points to


def unsupported(architecture: str, reasons: list[str] = ()) -> AdapterError:
    """The error: what was got and why it does not fit (where an adapter claims the architecture but not its parts),
    every supported architecture, and the guide to adding a family."""
    supported = sorted({a for _, cls in adapters.items() for a in cls.architectures})
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return AdapterError(
        f"No adapter supports architecture {architecture}{why}. Supported: {', '.join(supported)}. "
        f"To add a family, see {ADDING_A_FAMILY}"
    )
