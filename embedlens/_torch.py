"""Torch helpers for modules that import torch inside their functions, so that importing them (``embedlens
validate`` imports the plugins a plan names, to check them) does not load torch."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def no_grad(fn: F) -> F:
    """``@torch.no_grad()``, with torch imported at the first call rather than when the function is defined.

    Example:
        >>> @no_grad
        ... def grad_on():
        ...     import torch
        ...     return torch.is_grad_enabled()
        >>> grad_on()
        False
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
