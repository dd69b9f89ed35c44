"""Where a model comes from: one resolver per kind of source, in the `sources` registry.

`embedlens.load_model(source)` reads the source string and hands it to a resolver:

- ``PREFIX:NAME`` where PREFIX is a registered prefixed source: ``zoo:`` (a
  model trained by embedlens and shipped with it, `embedlens.zoo`), ``tiny:``
  (a tiny random model of a family, `embedlens.testing.tiny`), or a plugin's;
- anything else: a local folder or a hub id (``hub``), loaded with
  ``from_pretrained``; with ``remote=True``, the same id run on NDIF (``remote``).

A resolver is a `Source` subclass (`embedlens.adapters.sources`) registered
under its prefix; a package adds one through the ``embedlens.sources``
entry-point group. This module, the built-in resolvers, imports the adapters,
the zoo and the tiny models; the adapters never import it (they reach it
through the registry), so no import circle runs through the sources.

Example:
    >>> from embedlens.registry import sources
    >>> sorted(sources)
    ['hub', 'remote', 'tiny', 'zoo']
    >>> resolve("tiny:llava-clip")
    (<class 'embedlens.sources.TinySource'>, 'llava-clip')
    >>> resolve("llava-hf/llava-1.5-7b-hf", remote=True)
    (<class 'embedlens.sources.RemoteSource'>, 'llava-hf/llava-1.5-7b-hf')
"""

from __future__ import annotations

from embedlens.adapters.sources import Source, resolve
from embedlens.errors import AdapterError
from embedlens.registry import sources


@sources.register("hub")
class HubSource(Source):
    """A local folder or a Hugging Face hub id, loaded with ``from_pretrained``."""

    prefixed = False
    remote = False

    def load(self, name, *, adapter, dtype, device, attn_implementation, placement):
        from embedlens.adapters import adapter_for_architecture
        from embedlens.registry import adapters

        if adapter is not None:
            cls = adapters.get(adapter)
        else:
            from transformers import AutoConfig

            from embedlens.adapters._remote_code import NO_REMOTE_CODE, refuse_remote_code

            refuse_remote_code(name)
            try:
                config = AutoConfig.from_pretrained(name, **NO_REMOTE_CODE)
            except OSError as e:
                raise AdapterError(f"cannot load a model config from {name!r}: {e}") from None
            cls = adapter_for_architecture(getattr(config, "architectures", None), getattr(config, "model_type", ""), config)
        return cls.from_pretrained(name, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                   placement=placement, remote=self.remote)


@sources.register("remote")
class RemoteSource(HubSource):
    """A hub id run on NDIF: only its config and processor are loaded here (`embedlens.adapters.remote`)."""

    remote = True
    remote_ok = True


@sources.register("zoo")
class ZooSource(Source):
    """``zoo:NAME``: a model trained by embedlens and shipped with it (`embedlens.zoo.ZOO`)."""

    def load(self, name, *, adapter, dtype, device, attn_implementation, placement):
        from embedlens.zoo import load_zoo

        return load_zoo(name, adapter=adapter, dtype=dtype, device=device, attn_implementation=attn_implementation,
                        placement=placement)


def _cast(model, dtype):
    """`model` in `dtype`, its complex buffers kept complex: ``Module.to(dtype)`` would cast them to the real dtype,
    dropping their imaginary part (Llama 4's vision rotary frequencies, ``freqs_ci``); they are set aside meanwhile."""
    kept = []
    for name, buf in list(model.named_buffers()):
        if buf.is_complex():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            kept.append((module, attr, buf, attr not in module._non_persistent_buffers_set))
            del module._buffers[attr]
    model = model.to(dtype=dtype)
    for module, attr, buf, persistent in kept:
        module.register_buffer(attr, buf, persistent=persistent)
    return model


@sources.register("tiny")
class TinySource(Source):
    """``tiny:NAME``: a tiny random model of a family, built offline (`embedlens.testing.TINY_SPECS`)."""

    def load(self, name, *, adapter, dtype, device, attn_implementation, placement):
        from embedlens.adapters import wrap_model
        from embedlens.adapters.base import parse_dtype
        from embedlens.adapters.placement import loading_kwargs, place
        from embedlens.testing.tiny import tiny_model

        model, processor = tiny_model(name)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if placement is not None and placement.spread:
            model = place(_cast(model, parse_dtype(dtype)), placement)
        else:
            if placement is not None and placement.quantization is not None:
                loading_kwargs(placement)  # the installation's own error first (no bitsandbytes, no GPU)
                raise AdapterError("model.quantization: only checkpoints loaded with from_pretrained can be quantised (not tiny: models)")
            model = _cast(model, parse_dtype(dtype)).to(device)
        wrapped = wrap_model(model, processor, adapter)
        wrapped.source = f"tiny:{name}"
        return wrapped


__all__ = ["HubSource", "RemoteSource", "Source", "TinySource", "ZooSource", "resolve"]  # Source, resolve: re-exported
