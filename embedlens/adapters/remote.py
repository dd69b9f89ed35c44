"""Models run on NDIF through nnsight's remote backend: a weightless skeleton here, the forward passes there.

With ``model.remote: true`` a plan's probe passes are sent to the National Deep
Inference Fabric (NDIF): `load_skeleton` builds the model from its hub config
on the ``meta`` device (the config and the processor are the only downloads),
`remote_wrapper` gives nnsight the identity NDIF keys models by (the hub id,
through `nnsight.modeling.transformers.TransformersModel`), and
`embedlens.tracing.collect` traces with ``remote=True``: nnsight serialises the
traced block and its ``.save()`` points into a request, NDIF runs it on its
copy of the checkpoint and returns the saved activations. The vocabulary
matrices the lenses compare against are fetched the same way, once
(`remote_weight`).

The intervention engine runs the model layer by layer in this process, so it
cannot run remotely; `embedlens.plan.runner` refuses a plan with conditions
and ``remote: true`` before anything loads. Set ``NDIF_API_KEY`` (or nnsight's
``CONFIG.API.APIKEY``) to authenticate.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from embedlens.adapters._remote_code import NO_REMOTE_CODE
from embedlens.errors import AdapterError


class Wrapped(Protocol):
    """What these functions read of an `Adapter` (a protocol, so this module need not import the adapter it serves)."""

    model: torch.nn.Module
    processor: Any
    tokenizer: Any
    nnsight: Any


def load_skeleton(model_class, path: str, dtype: torch.dtype):
    """The model built from its hub config with every weight on ``meta`` (nothing is downloaded but the config).

    Raises:
        AdapterError: the config cannot be read (offline, unknown id).
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **NO_REMOTE_CODE)
    except OSError as e:
        raise AdapterError(f"cannot load a model config from {path!r}: {e}") from None
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    model.config._name_or_path = path  # NDIF's key: the hub id
    return model.eval()


def remote_wrapper(adapter: Wrapped):
    """The adapter's model as an nnsight model NDIF can run: keyed by its hub id (``name_or_path``)."""
    from nnsight.modeling.transformers import TransformersModel

    repo = getattr(adapter.model.config, "_name_or_path", None)
    if not repo:
        raise AdapterError("model.remote: the model has no hub id (config._name_or_path) for NDIF to find it by")
    adapter.model.name_or_path = repo  # what nnsight reads the repo id from
    # nnsight wraps the module in a transformers pipeline, which moves it to `device`: where it already is (meta for a skeleton)
    where = next(adapter.model.parameters()).device
    return TransformersModel(adapter.model, task="image-text-to-text", processor=adapter.processor, tokenizer=adapter.tokenizer,
                             device=where)


def remote_weight(adapter: Wrapped, module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """A weight of the remote model (e.g. the input embeddings), fetched with one remote trace on a one-token input."""
    root = adapter.nnsight
    path = next((n for n, m in adapter.model.named_modules() if m is module), None)
    if path is None:
        raise AdapterError(f"{type(module).__name__} is not a module of the model")
    envoy = root
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    bos = adapter.tokenizer.bos_token_id if adapter.tokenizer.bos_token_id is not None else 0
    with torch.no_grad():
        with root.trace(input_ids=torch.tensor([[bos]]), remote=True) as tracer:
            value = getattr(envoy, name).save()
            tracer.stop()
    return value.detach()
