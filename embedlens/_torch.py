"""Torch helpers for modules that import torch inside their functions, so that importing them (``embedlens
validate`` imports the plugins a plan names, to check them) does not load torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

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


class _Stop(Exception):
    """Raised by `run_to`'s hook to end a forward once the module it waits for is reached."""


@dataclass
class Reached:
    """What a module was given (and, when asked, returned) in a forward `run_to` stopped there."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any = None

    def hidden(self, name: str = "hidden_states", at: int = 0) -> Any:
        """The module's input `name`, given as a keyword or as positional argument `at`."""
        return self.kwargs[name] if name in self.kwargs else self.args[at]


def run_to(module: Any, forward: Callable[[], Any], *, output: bool = False) -> Reached | None:
    """Call `forward` (a forward pass that runs `module`) only as far as `module`: stop once it is given its
    input, or, with `output`, once it has returned. Nothing after it is computed.

    Returns:
        what `module` was given (and returned), or None when the forward ended without reaching it.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> x = torch.ones(1, 2)
        >>> reached = run_to(net[1], lambda: net(x))
        >>> torch.equal(reached.args[0], net[0](x))
        True
        >>> torch.equal(run_to(net[1], lambda: net(x), output=True).output, net[1](net[0](x)))
        True
        >>> run_to(torch.nn.Linear(1, 1), lambda: net(x)) is None  # never reached: the forward ran to its end
        True
    """
    seen: list[Reached] = []

    def take_input(mod, args, kwargs):
        seen.append(Reached(args, kwargs))
        if not output:
            raise _Stop

    def take_output(mod, args, out):
        seen[-1].output = out
        raise _Stop

    handles = [module.register_forward_pre_hook(take_input, with_kwargs=True)]
    if output:
        handles.append(module.register_forward_hook(take_output))
    try:
        forward()
    except _Stop:
        pass  # the hook ended the forward on purpose: nothing after `module` is needed
    finally:
        for h in handles:
            h.remove()
    return seen[0] if seen else None
