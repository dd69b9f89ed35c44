"""Model-family adapters and `load_model`, which picks one from a model's config.

Example:
    >>> from embedlens.adapters import load_model
    >>> adapter = load_model("tiny:llava-siglip")
    >>> adapter.name, adapter.tower, adapter.n_llm_layers
    ('llava', 'siglip', 4)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from embedlens._lazy import lazy_names
from embedlens.adapters._unsupported import ADDING_A_FAMILY, unsupported
from embedlens.adapters.sources import resolve
from embedlens.errors import AdapterError
from embedlens.registry import adapters

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

    from embedlens.adapters.base import Adapter
    from embedlens.adapters.placement import Placement

# Public name -> module. The families import transformers' model classes (seconds of imports); they load on the
# first use of one of these names or of the adapter registry (whose built-ins are `embedlens.adapters.families`),
# so a module that only needs `resolve_path` or `Placement`, and `embedlens validate`, stays light.
_LAZY = {
    "Adapter": "embedlens.adapters.base",
    "Batch": "embedlens.adapters.base",
    "ModulePaths": "embedlens.adapters.base",
    "PromptText": "embedlens.adapters.base",
    "Capability": "embedlens.adapters.capabilities",
    "Placement": "embedlens.adapters.placement",
    "Gemma3Adapter": "embedlens.adapters.gemma3",
    "Gemma4Adapter": "embedlens.adapters.gemma4",
    "Gemma4ImageProcessor": "embedlens.adapters.gemma4",
    "Glm4vAdapter": "embedlens.adapters.glm4v",
    "Glm4vImageProcessor": "embedlens.adapters.glm4v",
    "Glm4vMoeAdapter": "embedlens.adapters.glm4v",
    "Idefics3Adapter": "embedlens.adapters.idefics3",
    "SmolVLMAdapter": "embedlens.adapters.idefics3",
    "SmolVLMImageProcessor": "embedlens.adapters.idefics3",
    "InternVLAdapter": "embedlens.adapters.internvl",
    "InternVLImageProcessor": "embedlens.adapters.internvl",
    "LlavaAdapter": "embedlens.adapters.llava",
    "LlavaNextAdapter": "embedlens.adapters.llava_next",
    "LlavaNextVideoAdapter": "embedlens.adapters.llava_next_video",
    "LlavaNextVideoImageProcessor": "embedlens.adapters.llava_next_video",
    "LlavaOnevisionAdapter": "embedlens.adapters.llava_onevision",
    "LlavaOnevision15Adapter": "embedlens.adapters.llava_onevision1_5",
    "LlavaPixtralAdapter": "embedlens.adapters.llava_pixtral",
    "OnevisionImageProcessor": "embedlens.adapters.llava_onevision",
    "Mistral3Adapter": "embedlens.adapters.mistral3",
    "PixtralProcessor": "embedlens.adapters.mistral3",
    "PaliGemmaAdapter": "embedlens.adapters.paligemma",
    "Qwen2VLAdapter": "embedlens.adapters.qwen2_vl",
    "Qwen2_5_VLAdapter": "embedlens.adapters.qwen2_vl",
    "Qwen3VLAdapter": "embedlens.adapters.qwen2_vl",
    "Qwen3_5Adapter": "embedlens.adapters.qwen3_5",
    "Qwen3VLMoeAdapter": "embedlens.adapters.qwen3_vl_moe",
    "Llama4Adapter": "embedlens.adapters.llama4",
    "Llama4ImageProcessorPil": "embedlens.adapters.llama4_tiles",
    "Molmo2Adapter": "embedlens.adapters.molmo2",
    "Molmo2ImageProcessor": "embedlens.adapters.molmo2",
    "Molmo2ImageProcessorNoTorchvision": "embedlens.adapters.molmo2_crops",
}


__getattr__ = lazy_names(__name__, _LAZY)


TINY_PREFIX = "tiny:"
ZOO_PREFIX = "zoo:"

__all__ = [
    "Adapter",
    "Batch",
    "Capability",
    "Gemma3Adapter",
    "Gemma4Adapter",
    "Gemma4ImageProcessor",
    "Glm4vAdapter",
    "Glm4vImageProcessor",
    "Glm4vMoeAdapter",
    "Idefics3Adapter",
    "InternVLAdapter",
    "InternVLImageProcessor",
    "Llama4Adapter",
    "Llama4ImageProcessorPil",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaNextVideoAdapter",
    "LlavaNextVideoImageProcessor",
    "LlavaOnevision15Adapter",
    "LlavaOnevisionAdapter",
    "LlavaPixtralAdapter",
    "Mistral3Adapter",
    "ModulePaths",
    "Molmo2Adapter",
    "Molmo2ImageProcessor",
    "Molmo2ImageProcessorNoTorchvision",
    "OnevisionImageProcessor",
    "PaliGemmaAdapter",
    "PixtralProcessor",
    "PromptText",
    "Qwen2VLAdapter",
    "Qwen3_5Adapter",
    "Qwen3VLMoeAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "SmolVLMAdapter",
    "SmolVLMImageProcessor",
    "adapter_for_architecture",
    "load_model",
    "wrap_model",
]


def adapter_for_architecture(architectures: list[str] | tuple[str, ...] | None, model_type: str = "",
                             config: PretrainedConfig | None = None) -> type[Adapter]:
    """The registered adapter class that supports one of `architectures` (and, given the model's `config`, fits
    its parts: `Adapter.mismatch`, e.g. `LlavaForConditionalGeneration` with a Pixtral tower).

    Raises:
        AdapterError: listing every supported architecture (and why the adapters of this one do not fit its
            config) and pointing to docs/adding-a-family.md.
    """
    reasons = []
    for name, cls in adapters.items():
        if set(architectures or ()) & set(cls.architectures):
            reason = None if config is None else cls.mismatch(config)
            if reason is None:
                return cls
            reasons.append(reason)
    raise unsupported(", ".join(architectures or ()) or f"(none; model_type {model_type!r})", reasons)


def wrap_model(model: PreTrainedModel, processor: ProcessorMixin, adapter: str | None = None) -> Adapter:
    """Wrap an already-loaded model and processor in the adapter for its family.

    Raises:
        UnknownNameError: `adapter` is not a registered adapter.
        AdapterError: the model is not an instance of the forced adapter's model class.
    """
    if adapter is not None:
        cls = adapters.get(adapter)
        if not isinstance(model, cls.model_class):
            raise AdapterError(
                f"adapter {adapter!r} takes {cls.model_class.__name__} models; got {type(model).__name__}"
            )
    else:
        archs = getattr(model.config, "architectures", None) or [type(model).__name__]
        cls = adapter_for_architecture(archs, getattr(model.config, "model_type", ""), model.config)
    return cls(model, processor)


def load_model(
    source: str,
    *,
    adapter: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    placement: Placement | None = None,
    remote: bool = False,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> Adapter:
    """Load a model and wrap it in its adapter.

    Args:
        source: a local folder or hub id (loaded with `from_pretrained`),
            ``zoo:NAME`` for a trained model shipped with embedlens (see
            `embedlens.zoo`), ``tiny:NAME`` for a built-in tiny random
            model (see `embedlens.testing.TINY_SPECS`), or ``PREFIX:NAME`` of a
            source a plugin registers (`embedlens.sources`).
        adapter: force an adapter by registered name instead of choosing one
            from the config's `architectures` (for every kind of source); the
            checkpoint's weights must then fill that adapter's model class exactly.
        dtype, device, attn_implementation: passed to `from_pretrained`.
        placement: a device map / memory limits / quantisation (`embedlens.adapters.placement.Placement`):
            passed to `from_pretrained`, or applied with accelerate's `dispatch_model` to a ``tiny:`` model.
        remote: a hub id run on NDIF (`embedlens.adapters.remote`): only its config and processor are loaded here.
        processor_kwargs: image processor settings the family declares (a plan's ``model.processor_kwargs``:
            Qwen-VL's ``min_pixels`` / ``max_pixels``, InternVL's ``max_dynamic_patch``; see
            `embedlens.adapters.processor_options`).

    Raises:
        AdapterError: the architecture has no adapter (the error lists the
            supported ones), or the checkpoint's weights do not fit the adapter's
            model (missing, unexpected or wrongly shaped weights, named).
        UnknownNameError: an unknown adapter, zoo or tiny-model name.
    """
    if adapter is not None:
        adapters.get(adapter)  # an unknown name fails here, whatever the source
    source_cls, name = resolve(source, remote)  # the resolvers are in embedlens.sources, reached through the registry
    if processor_kwargs and adapter is not None:  # a forced family's keys, checked before the weights load
        from embedlens.adapters.processor_options import check_processor_kwargs

        check_processor_kwargs(adapters.get(adapter), processor_kwargs)
    loaded = source_cls().load(name, adapter=adapter, dtype=dtype, device=device, attn_implementation=attn_implementation,
                               placement=placement)
    if processor_kwargs:
        from embedlens.adapters.processor_options import configure_processor

        configure_processor(loaded, processor_kwargs)
    return loaded
