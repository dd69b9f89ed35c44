"""The adapter contract's named capabilities: the repo's own adapters declare them and read none of the old flag
names; a third party's subclass written with the old names still works and is told the new ones; one spelling per
family across the adapter name, its module and its tiny model."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from embedlens.adapters import Capability, LlavaAdapter, load_model
from embedlens.adapters.capabilities import DEPRECATED_FLAGS, DEPRECATION_PREFIX
from embedlens.data import Sample
from embedlens.errors import AdapterError, InputError
from embedlens.registry import adapters
from embedlens.testing import TINY_ALIASES, TINY_SPECS, tiny_model
from embedlens.testing.images import shapes


def _flag_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)
            and str(w.message).startswith(DEPRECATION_PREFIX)]


def test_importing_the_package_and_its_plugins_warns_nothing_and_the_old_module_name_still_imports():
    """A fresh interpreter where every DeprecationWarning is an error: importing the adapters (whose classes are
    checked at definition by `__init_subclass__`) and loading every registered adapter and plugin raises none;
    then the old module name `embedlens.adapters.qwen_vl` imports the same classes, with a warning."""
    code = ("import embedlens, embedlens.adapters, embedlens.sources\n"
            "from embedlens.registry import adapters\n"
            "print(sorted(n for n, _ in adapters.items()))\n"
            "try:\n    import embedlens.adapters.qwen_vl\nexcept DeprecationWarning as e:\n    print('warned:', e)\n"
            "import warnings\nwarnings.simplefilter('ignore')\n"
            "from embedlens.adapters.qwen_vl import Qwen2VLAdapter\n"
            "from embedlens.adapters.qwen2_vl import Qwen2VLAdapter as New\n"
            "print(Qwen2VLAdapter is New)\n")
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "qwen2_5_vl" in out.stdout
    assert "warned: embedlens.adapters.qwen_vl is deprecated; import from embedlens.adapters.qwen2_vl" in out.stdout
    assert out.stdout.rstrip().endswith("True")


def test_every_registered_adapter_instantiates_and_answers_without_a_deprecation_warning():
    families = {spec.family: name for name, spec in TINY_SPECS.items()}
    registered = dict(adapters.items())
    assert set(registered) <= set(families), set(registered) - set(families)  # every adapter has a tiny model
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for family, cls in registered.items():
            model, processor = tiny_model(families[family])
            adapter = cls(model, processor)
            assert all(adapter.has(c) == (c in cls.capabilities) for c in Capability)
            assert 0 < adapter.vision_layers_needed <= adapter.n_vision_layers
    assert _flag_warnings(record) == []


def test_capabilities_are_frozensets_of_capability_and_names_are_accepted():
    class ByName(LlavaAdapter):
        capabilities = {"mrope", Capability.PACKED_TOWER}

    assert ByName.capabilities == frozenset({Capability.MROPE, Capability.PACKED_TOWER})
    model, processor = tiny_model("llava-clip")
    by_name = ByName(model, processor)
    assert by_name.has("mrope") and by_name.has(Capability.PACKED_TOWER) and not by_name.has(Capability.DEEPSTACK)
    with pytest.raises(AdapterError, match=r"has\(\): unknown capability 'rope3d'"):
        by_name.has("rope3d")
    with pytest.raises(AdapterError, match=r"Bad\.capabilities: unknown capability 'rope3d'; expected one of single_image, "):
        class Bad(LlavaAdapter):
            capabilities = {"rope3d"}
    with pytest.raises(AdapterError, match=r"Str\.capabilities must be a set"):
        class Str(LlavaAdapter):
            capabilities = "mrope"


def test_a_third_party_subclass_with_the_old_flag_names_still_works_and_warns():
    with pytest.warns(DeprecationWarning) as record:
        class OldStyle(LlavaAdapter):
            packed_vision = True  # old name, set: now PACKED_TOWER
            multi_image = False  # the inverted one: now SINGLE_IMAGE
            selects_vision_layer = False  # unsets what LlavaAdapter declares

    messages = _flag_warnings(record)
    assert len(messages) == 3
    assert any("'packed_vision'" in m and "Capability.PACKED_TOWER" in m and "OldStyle" in m for m in messages)
    assert any("'multi_image'" in m and "Capability.SINGLE_IMAGE" in m for m in messages)
    assert OldStyle.capabilities == frozenset({Capability.PACKED_TOWER, Capability.SINGLE_IMAGE})
    assert LlavaAdapter.capabilities == frozenset({Capability.VISION_FEATURE_LAYER})  # the parent is untouched

    # reading the old names, on the class and on an instance, answers from the capabilities and warns
    model, processor = tiny_model("llava-clip")
    adapter = OldStyle(model, processor)
    for owner in (OldStyle, adapter):
        with pytest.warns(DeprecationWarning, match=r"Adapter flag 'packed_vision' is deprecated; read adapter\.has\(Capability\.PACKED_TOWER\)"):
            assert owner.packed_vision is True
        with pytest.warns(DeprecationWarning, match=r"not adapter\.has\(Capability\.SINGLE_IMAGE\)"):
            assert owner.multi_image is False
        with pytest.warns(DeprecationWarning):
            assert owner.mrope is False
    with pytest.warns(DeprecationWarning):
        assert LlavaAdapter.selects_vision_layer is True and adapter.selects_vision_layer is False
    assert set(DEPRECATED_FLAGS) >= {"packed_vision", "multi_image", "mrope", "has_image_newline", "answer_as_suffix",
                                     "merge_before_projector", "deepstack", "window_bounds_blocks", "selects_vision_layer"}

    # setting an old name on an instance (as before) acts on that instance's capabilities, with a warning
    other = LlavaAdapter(model, processor)
    with pytest.warns(DeprecationWarning, match=r"Adapter flag 'mrope' set on an instance is deprecated; declare Capability\.MROPE"):
        other.mrope = True
    with pytest.warns(DeprecationWarning):
        other.selects_vision_layer = False
    assert other.has(Capability.MROPE) and not other.has(Capability.VISION_FEATURE_LAYER)
    assert LlavaAdapter.capabilities == frozenset({Capability.VISION_FEATURE_LAYER})  # the class is untouched

    # and the mapped capabilities act: SINGLE_IMAGE refuses a second image, no VISION_FEATURE_LAYER runs every layer
    two = Sample([shapes(32, seed=0), shapes(32, seed=1)], prompt="<image><image> what?", id="two")
    with pytest.raises(InputError, match=r"sample 'two' has 2 images; .* takes one per prompt"):
        adapter.encode([two])
    assert adapter.vision_layers_needed == adapter.n_vision_layers
    LlavaAdapter(model, processor).encode([two])  # the family itself takes both

    # a plugin registry takes the old-style class as before
    reg = adapters.fresh()
    reg.add("old_style", OldStyle)
    assert reg.get("old_style") is OldStyle


def test_one_spelling_per_family():
    """A tiny name is its adapter's name (or ADAPTER-TOWER), and each adapter module is named after one of the
    adapters it hosts."""
    for name, spec in TINY_SPECS.items():
        assert spec.family in dict(adapters.items()), name
        assert name == spec.family or name.startswith(spec.family + "-"), name
    by_module: dict[str, set[str]] = {}
    for name, cls in adapters.items():
        by_module.setdefault(cls.__module__, set()).add(name)
    for module, names in by_module.items():
        assert module.rsplit(".", 1)[1] in names, (module, names)
    assert by_module["embedlens.adapters.qwen2_vl"] == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


@pytest.mark.parametrize("old", ["qwen2.5-vl", "llava-next"])
def test_old_tiny_names_load_the_same_model_with_a_warning(old):
    new = TINY_ALIASES[old]
    with pytest.warns(DeprecationWarning, match=rf"tiny model '{old}' is now spelled '{new}'"):
        adapter = load_model(f"tiny:{old}")
    assert adapter.name == new == TINY_SPECS[new].family
    want = tiny_model(new)[0].state_dict()
    got = adapter.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
