"""Loading helpers of the adapter contract: dtype names, and the check that a checkpoint fills its model exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedlens.errors import AdapterError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The dtype names a plan may give, each torch's attribute of that name (read when a model loads: no torch import here).
DTYPES = ("float32", "float16", "bfloat16", "float64")


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype for a plan's dtype name.

    Raises:
        AdapterError: naming the allowed values.
    """
    if name not in DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    import torch

    return getattr(torch, name)


def _names(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights_fit(label: str, path: str, model: PreTrainedModel, info: dict[str, Any]) -> None:
    """Refuse a model whose checkpoint does not fill it exactly.

    `from_pretrained` initialises missing weights at random and drops
    unexpected ones with only a log message; a forced adapter on another
    family's checkpoint (or a damaged one) would then run as a random model.

    Args:
        label: the adapter and class, for the message.
        path: the checkpoint.
        model: the loaded model (for its config).
        info: `from_pretrained(..., output_loading_info=True)`'s report.

    Raises:
        AdapterError: naming the missing, unexpected and wrongly shaped weights.
    """
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in info.get("mismatched_keys") or ()]
    errors = list(info.get("error_msgs") or ())
    if not (missing or unexpected or mismatched or errors):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) the model needs are not in the checkpoint (they would be random): {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint weight(s) have no place in the model: {_names(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} weight(s) have the wrong shape: {_names(mismatched)}")
    if errors:
        parts.append(f"loading errors: {'; '.join(errors[:3])}")
    cfg = model.config
    raise AdapterError(
        f"{label} does not fit the weights in {path!r}: " + "; ".join(parts) + ". The checkpoint's config says "
        f"architectures {getattr(cfg, 'architectures', None)}, model_type {getattr(cfg, 'model_type', None)!r}: "
        "is model.adapter right for it?"
    )
