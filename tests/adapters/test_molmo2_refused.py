"""Molmo2 (`Molmo2ForConditionalGeneration`, transformers 5.25) has no adapter yet: a checkpoint of it is refused
with the listing error (every supported architecture, the guide), by `load_model`, `embedlens validate` and
`embedlens run`, never with a raw error from inside the loader. Delete this file when an adapter serves Molmo2.

The configuration is Hugging Face's own tester's (`Molmo2VisionText2TextModelTester.get_config` in
tests/models/molmo2/test_modeling_molmo2.py); only its config.json is written: the refusal comes from the
architecture alone.
"""

from __future__ import annotations

import pytest
from transformers.models.molmo2.configuration_molmo2 import (
    Molmo2AdapterConfig,
    Molmo2Config,
    Molmo2TextConfig,
    Molmo2VisionConfig,
)
from typer.testing import CliRunner

from embedlens.adapters import ADDING_A_FAMILY, load_model
from embedlens.cli import app
from embedlens.errors import AdapterError
from embedlens.registry import adapters

ARCH = "Molmo2ForConditionalGeneration"


def _tester_config() -> Molmo2Config:
    text = Molmo2TextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_act="silu", head_dim=128,
                            hidden_size=32, vocab_size=99, intermediate_size=37, max_position_embeddings=512,
                            num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rope_theta=10000.0,
                            rms_norm_eps=1e-6)
    vision = Molmo2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, head_dim=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                image_size=[378, 378], patch_size=14, attention_dropout=0.0)
    adapter = Molmo2AdapterConfig(vision_feature_layer=[1], hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                  head_dim=8, intermediate_size=37, text_hidden_size=32, hidden_act="silu")
    return Molmo2Config(text_config=text, vision_config=vision, adapter_config=adapter, image_start_token_id=3,
                        image_end_token_id=4, image_patch_id=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("work") / "ckpt"
    config = _tester_config()
    config.architectures = [ARCH]  # as a released checkpoint's config.json (model.save_pretrained) names it
    config.save_pretrained(folder)
    return folder


def _supported() -> str:
    return ", ".join(sorted({a for _, cls in adapters.items() for a in cls.architectures}))  # adapters may share one


def test_no_adapter_claims_molmo2():
    assert all(ARCH not in cls.architectures for _, cls in adapters.items())


def test_load_model_refuses_molmo2_with_the_listing(checkpoint):
    with pytest.raises(AdapterError) as e:
        load_model(str(checkpoint))
    assert str(e.value) == (f"No adapter supports architecture {ARCH}. Supported: {_supported()}. "
                            f"To add a family, see {ADDING_A_FAMILY}")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_the_cli_refuses_molmo2_with_exit_status_2(checkpoint, command):
    plan = checkpoint.parent / "plan.yaml"
    plan.write_text(f"model: {{source: ./ckpt}}\ndata: {{synthetic: {{n: 2, seed: 1}}}}\n"
                    f"probes: [{{name: embedding_lens}}]\noutput: {{dir: out}}\n")
    r = CliRunner().invoke(app, [command, str(plan)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    flat = " ".join(r.output.split())  # the console wraps long lines
    assert f"No adapter supports architecture {ARCH}. Supported: " in flat, r.output
    assert "Qwen3VLForConditionalGeneration" in flat and ADDING_A_FAMILY in flat
