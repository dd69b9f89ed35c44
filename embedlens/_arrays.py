"""The array namespace a token-role map and a selection compute with: torch for torch tensors, NumPy otherwise.

`embedlens.roles.TokenRoles` and `embedlens.interventions.select.Selection` are written once, against the
handful of torch functions below (called as ``xp.where(...)``, never as tensor methods that NumPy lacks).
A run hands them torch tensors and gets torch itself: the same ops as before, on the device, no copy.
`validate` counts a control's pool on a role map of NumPy arrays (`embedlens.plan.pools.fixed_layout`) and
gets this module's NumPy shim, so checking a plan never imports torch (about 1.5 s) and still evaluates the
selections with the run's own code.

Example:
    >>> import numpy as np
    >>> xp = namespace(np.arange(3))
    >>> xp.where(xp.isin(np.arange(4), xp.tensor([1, 3], dtype=xp.long)), 1, 0).tolist()
    [0, 1, 0, 1]
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType


def namespace(x) -> ModuleType:
    """torch where `x` is a torch tensor, else the NumPy shim (`numpy_ns`); never imports torch itself."""
    loaded = sys.modules.get("torch")  # a torch tensor exists only once torch is imported: never import it here
    if loaded is not None and isinstance(x, loaded.Tensor):
        return loaded
    return numpy_ns()


def device_of(x):
    """`x`'s device (torch), or None for a NumPy array (which has none before NumPy 2)."""
    return getattr(x, "device", None)


def on_device(xp: ModuleType, values: list[int], device):
    """A list of ints as a long array of `xp` on `device`; for torch copied asynchronously:
    ``torch.tensor(values, device=cuda)`` makes the host wait for the copy and everything queued before it (a
    selection's list is small, which the driver copies from pageable memory without that wait)."""
    t = xp.tensor(values, dtype=xp.long)
    return t if xp is numpy_ns() else t.to(device, non_blocking=True)


def to_device(xp: ModuleType, t, device):
    """`t` on `device` (torch's ``.to``); a NumPy array is already where it is used."""
    return t if xp is numpy_ns() else t.to(device)


def to_host(xp: ModuleType, t):
    """`t` on the host (torch's ``.cpu()``); a NumPy array is there."""
    return t if xp is numpy_ns() else t.cpu()


@functools.cache
def numpy_ns() -> ModuleType:
    """The NumPy shim: torch's names and keywords (``dim=``, ``dtype=torch.bool``, ``device=``) on NumPy arrays.

    Only what `TokenRoles` and `Selection` call; a ``device`` argument is ignored (NumPy arrays are on the host).
    """
    import numpy as np

    ns = ModuleType("embedlens._arrays.numpy", "torch-named functions on NumPy arrays (see embedlens._arrays)")
    ns.bool, ns.long, ns.Tensor = np.bool_, np.int64, np.ndarray
    ns.is_tensor = lambda x: isinstance(x, (np.ndarray, np.generic))  # a 0-d result is a NumPy scalar
    ns.ones_like = lambda x, dtype=None: np.ones_like(x, dtype=dtype)
    ns.zeros_like = lambda x, dtype=None: np.zeros_like(x, dtype=dtype)
    ns.full_like = lambda x, fill, dtype=None: np.full_like(x, fill, dtype=dtype)
    ns.full = lambda shape, fill, dtype=None: np.full(shape, fill, dtype=np.int64 if dtype is None else dtype)
    ns.arange = lambda *a, dtype=None, device=None: np.arange(*a, dtype=np.int64 if dtype is None else dtype)
    ns.tensor = lambda values, dtype=None: np.array(values, dtype=dtype)
    ns.as_tensor = lambda x, dtype=None: np.asarray(x, dtype=dtype)
    ns.clone = lambda x: np.array(x, copy=True)
    ns.isin = np.isin
    ns.where = np.where
    ns.cumsum = lambda x, dim, dtype=None: np.cumsum(x, axis=dim, dtype=dtype)
    ns.sum = lambda x, dim: np.sum(x, axis=dim)
    ns.amin = lambda x, dim: np.amin(x, axis=dim)
    ns.amax = lambda x, dim: np.amax(x, axis=dim)
    ns.broadcast_to = np.broadcast_to
    ns.tile = np.tile
    ns.repeat_interleave = np.repeat
    ns.cat = lambda arrays, dim=0: np.concatenate(arrays, axis=dim)
    for name, ufunc in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal),
                        ("eq", np.equal), ("ne", np.not_equal)]:  # two 0-d arrays give a NumPy scalar: an array, as torch
        setattr(ns, name, lambda a, b, ufunc=ufunc: np.asarray(ufunc(a, b)))
    return ns
