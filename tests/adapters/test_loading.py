"""Loading from a saved folder goes through `from_pretrained` and picks the adapter from the config."""

from __future__ import annotations

import re

import pytest
import torch

from embedlens.adapters import load_model
from embedlens.errors import AdapterError, UnknownNameError
from embedlens.testing import TINY_SPECS, save_tiny_model, tiny_model
from tests.conftest import mixed_samples


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_folder_round_trip(name, tmp_path):
    folder = save_tiny_model(name, tmp_path / name, seed=3)
    adapter = load_model(str(folder))
    assert adapter.name == TINY_SPECS[name].family
    model, _ = tiny_model(name, seed=3)
    batch = adapter.encode(mixed_samples(adapter=adapter)[:2])
    with torch.no_grad():
        ours = adapter.model(**adapter.model_inputs(batch)).logits
        ref = model(**adapter.model_inputs(batch)).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _idefics3_folder(path):
    """A tiny Idefics3 checkpoint (another family's weights): model only, no processor."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(vocab_size=120, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4),
        scale_factor=2,
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_forced_adapter_must_fit_the_weights(tmp_path):
    """A forced adapter whose model class does not fit the checkpoint is an error naming the weights,
    not a model with random (MISSING) weights that transformers only logs."""
    pali = save_tiny_model("paligemma", tmp_path / "pali")
    with pytest.raises(AdapterError, match=r"adapter 'llava'.*not in the checkpoint.*multi_modal_projector\.linear_1.*"
                                           r"no place in the model.*multi_modal_projector\.linear\.") as e:
        load_model(str(pali), adapter="llava")
    assert "paligemma" in str(e.value)  # says what the checkpoint is
    idefics = _idefics3_folder(tmp_path / "idefics3")
    with pytest.raises(AdapterError, match=r"not in the checkpoint.*language_model\.embed_tokens.*"
                                           r"no place in the model.*model\.text_model\."):
        load_model(str(idefics), adapter="llava")
    # a family whose classes crash on the other config: the crash is an AdapterError too
    clip = save_tiny_model("llava-clip", tmp_path / "clip")
    with pytest.raises(AdapterError, match=r"adapter 'paligemma' \(PaliGemmaForConditionalGeneration\) cannot load"):
        load_model(str(clip), adapter="paligemma")
    assert load_model(str(clip), adapter="llava").name == "llava"  # the right one still loads


def test_a_checkpoint_missing_a_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_model("llava-siglip", tmp_path / "m")
    (weights,) = folder.glob("*.safetensors")
    state = load_file(weights)
    (dropped,) = [k for k in state if k.endswith("multi_modal_projector.linear_2.weight")]  # the on-disk name
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"1 weight\(s\) the model needs are not in the checkpoint.*"
                                           r"model\.multi_modal_projector\.linear_2\.weight"):
        load_model(str(folder))


def test_forced_adapter_on_a_built_model_must_match_its_class():
    with pytest.raises(AdapterError, match=r"adapter 'llava' takes LlavaForConditionalGeneration models; got PaliGemma"):
        load_model("tiny:paligemma", adapter="llava")


def test_forced_adapter_applies_to_zoo_sources():
    with pytest.raises(UnknownNameError, match=r"Unknown adapter 'llava_onevison'. Did you mean: llava_onevision"):
        load_model("zoo:tiny-llava-clip", adapter="llava_onevison")
    with pytest.raises(AdapterError, match=r"adapter 'llava_onevision'.*not in the checkpoint.*model\.image_newline"):
        load_model("zoo:tiny-llava-clip", adapter="llava_onevision")
    assert load_model("zoo:tiny-llava-clip", adapter="llava").source == "zoo:tiny-llava-clip"


@pytest.mark.parametrize(("adapter", "expected"), [
    ("llava_onevison", r"model\.adapter: Unknown adapter 'llava_onevison'\. Did you mean: llava_onevision"),
    ("paligemma", r"model\.adapter: adapter 'paligemma' \(PaliGemmaForConditionalGeneration\) cannot load"),
])
def test_validate_checks_the_adapter_of_a_zoo_model(tmp_path, adapter, expected):
    from typer.testing import CliRunner

    from embedlens.cli import app

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"model:\n  source: zoo:tiny-llava-clip\n  adapter: {adapter}\n"
        "data:\n  synthetic: {n: 2, seed: 1, size: 96}\n"
        "probes:\n  - name: embedding_lens\n    params: {k: 2, layers: [0]}\n"
        f"output:\n  dir: {tmp_path / 'run'}\n"
    )
    r = CliRunner().invoke(app, ["validate", str(plan)])
    assert r.exit_code == 2, r.output
    assert re.search(expected, " ".join(r.output.split())), r.output
    assert "Traceback" not in r.output


def test_an_auto_map_beside_a_native_model_type_loads_natively_with_a_warning(tmp_path):
    """A folder of a model type transformers ships, with an auto_map into the folder's own code (as many hub checkpoints
    carry): it loads with transformers' classes, the same logits as without the auto_map, a warning names the ignored
    auto_map, and the folder's code never runs (was: refused). An auto_map beside an unknown model type is still refused."""
    import json

    folder = save_tiny_model("llava-clip", tmp_path / "m", seed=3)
    marker = tmp_path / "PWNED"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(9)\n")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava"
    for name in ("config.json", "tokenizer_config.json"):
        doc = json.loads((folder / name).read_text())
        doc["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel", "AutoTokenizer": ["evil.T", None]}
        (folder / name).write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"m/config\.json: auto_map \{\"AutoConfig\": \"evil\.EvilConfig\".* is ignored.*'llava' classes"):
        adapter = load_model(str(folder))
    assert not marker.exists() and adapter.name == TINY_SPECS["llava-clip"].family
    model, _ = tiny_model("llava-clip", seed=3)
    batch = adapter.encode(mixed_samples(adapter=adapter)[:2])
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(**adapter.model_inputs(batch)).logits, model(**adapter.model_inputs(batch)).logits)
    config["model_type"], config["auto_map"] = "evil_model", {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"config\.json: auto_map \{\"AutoConfig\": \"evil\.EvilConfig\"\} asks to import Python code"):
        load_model(str(folder))
    assert not marker.exists()


def test_moved_tester_configs_say_where_they_went():
    with pytest.raises(ImportError, match=r"embedlens\.testing\.TESTER_CONFIGS .*tests/support/hf_testers/"):
        from embedlens.testing import TESTER_CONFIGS  # noqa: F401
    from tests.support.hf_testers import TESTER_CONFIGS

    assert "llava_next" in TESTER_CONFIGS


def test_a_registered_source_is_reached_through_its_prefix():
    from embedlens.adapters.sources import Source
    from embedlens.registry import sources

    calls = []

    class Mirror(Source):
        """Loads the tiny model of the same name (a plugin's source, planted for the test)."""

        def load(self, name, *, adapter, dtype, device, attn_implementation, placement):
            calls.append((name, dtype, device))
            return load_model(f"tiny:{name}", adapter=adapter, dtype=dtype, device=device)

    sources.add("mirror", Mirror)
    try:
        adapter = load_model("mirror:llava-siglip", dtype="float64")
    finally:
        del sources._items["mirror"]
    assert calls == [("llava-siglip", "float64", "cpu")]
    assert adapter.tower == "siglip" and adapter.model.dtype == torch.float64
    with pytest.raises(AdapterError, match="NDIF runs hub checkpoints; 'tiny:llava-clip'"):
        load_model("tiny:llava-clip", remote=True)
