"""Families embedlens does not support are refused with the unsupported-architecture error (what was got, why it
does not fit where an adapter claims the architecture, the supported list, the guide), never a raw AttributeError
or a missing-module message: whole architectures of transformers 5.25 that no adapter serves, supported
architectures holding a vision tower no adapter takes, and a layout an adapter's module paths do not find.

The models are transformers' own classes built from their default configurations on the meta device (no weights
are made: the refusal comes before any is read), and their configs saved to folders for `load_model`.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from embedlens.adapters import ADDING_A_FAMILY, load_model, wrap_model
from embedlens.errors import AdapterError
from embedlens.registry import adapters
from embedlens.testing import tiny_model

#: released since the last families were added; transformers 5.25 has their classes, no adapter serves them yet
UNSUPPORTED = ("Idefics2ForConditionalGeneration",)

#: (architecture, vision tower) pairs HF builds but no adapter takes: LLaVA-style classes build whatever tower the
#: config names
FOREIGN_TOWERS = (("LlavaForConditionalGeneration", "dinov2"), ("LlavaForConditionalGeneration", "siglip2_vision_model"),
                  ("LlavaNextForConditionalGeneration", "pixtral"), ("LlavaOnevisionForConditionalGeneration", "pixtral"),
                  ("PaliGemmaForConditionalGeneration", "dinov2"), ("Gemma3ForConditionalGeneration", "dinov2"),
                  ("Mistral3ForConditionalGeneration", "siglip2_vision_model"),
                  ("LlavaNextVideoForConditionalGeneration", "pixtral"))


@pytest.fixture(scope="module")
def processor():
    return tiny_model("llava-clip")[1]  # never used: the refusal comes first


def _listing(msg: str, architecture: str) -> list[str]:
    """The supported architectures the error lists, after checking its shape."""
    assert msg.startswith(f"No adapter supports architecture {architecture}"), msg
    assert msg.endswith(f"To add a family, see {ADDING_A_FAMILY}"), msg
    assert "no module at" not in msg and "has no attribute" not in msg
    listed = msg.split("Supported: ", 1)[1].split(". To add", 1)[0].split(", ")
    assert listed == sorted({a for _, cls in adapters.items() for a in cls.architectures})
    return listed


def _meta(arch: str, **config):
    cls = getattr(transformers, arch)
    cfg = cls.config_class(**config)
    with torch.device("meta"):
        return cls(cfg), cfg


@pytest.mark.parametrize("arch", UNSUPPORTED)
def test_unsupported_architectures_get_the_listing_error(arch, processor, tmp_path):
    model, cfg = _meta(arch)
    with pytest.raises(AdapterError) as e:
        wrap_model(model, processor)
    assert arch not in _listing(str(e.value), arch)
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(AdapterError) as e:
        load_model(str(tmp_path))
    _listing(str(e.value), arch)


@pytest.mark.parametrize("arch,tower", FOREIGN_TOWERS)
def test_a_tower_no_adapter_takes_gets_the_listing_error_with_the_reason(arch, tower, processor, tmp_path):
    """Wrapped, from a saved config (refused before the model is built: HF's own classes crash on some of these
    pairings), and with the family's adapter forced."""
    model, cfg = _meta(arch, vision_config={"model_type": tower})
    claimed = [name for name, cls in adapters.items() if arch in cls.architectures]
    with pytest.raises(AdapterError) as e:
        wrap_model(model, processor)
    msg = str(e.value)
    assert arch in _listing(msg, f"{arch} (its vision tower is {tower!r}; adapter {claimed[0]!r} takes ")
    for name in claimed:
        assert f"adapter {name!r} takes " in msg
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(AdapterError) as e:
        load_model(str(tmp_path))
    _listing(str(e.value), f"{arch} (its vision tower is {tower!r}")
    with pytest.raises(AdapterError, match=rf"adapter {claimed[0]!r} does not fit this {arch}: its vision tower is {tower!r}"):
        wrap_model(model, processor, adapter=claimed[0])


def test_a_layout_the_adapters_paths_do_not_find_gets_the_listing_error(processor):
    """A model of a supported architecture whose parts sit elsewhere (here: its projector removed) is refused as a
    layout no adapter serves, naming the part, not with a missing-module message."""
    model, _ = tiny_model("llava-clip")
    del model.model.multi_modal_projector
    with pytest.raises(AdapterError) as e:
        wrap_model(model, processor)
    _listing(str(e.value), "LlavaForConditionalGeneration (adapter 'llava' reads its projector at "
                           "'model.multi_modal_projector', which this model lacks)")
