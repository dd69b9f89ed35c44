"""Whether a layer slides comes from what its attention does, not from a config attribute being present.

Reference: Hugging Face's own forward. HF's Idefics3/SmolVLM testers give the Llama text model
``sliding_window=32``, which ``LlamaModel`` ignores; Mistral and Gemma 3 do slide.
"""

import pytest
import torch

from embedlens.adapters import wrap_model
from embedlens.attention import layer_windows
from embedlens.data import Sample
from embedlens.interventions import Engine
from embedlens.testing.images import noise
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS, TESTER_CONFIGS

ALL = {**TESTER_CONFIGS, **BLOCK_TESTER_CONFIGS}
LONG_Q = "what is in the picture, and which colour is the large shape in the upper left corner of it?"


def _long_batch(name: str):
    tc = ALL[name]
    adapter = wrap_model(*tc.build(0))
    samples = [Sample([noise(h, w, seed=10 * i + k) for k in range(tc.images_per_sample)], question=LONG_Q, id=f"s{i}")
               for i, (h, w) in enumerate(tc.image_sizes)]
    return adapter, adapter.encode(samples, padding_side="left")


def _hf_logits(adapter, batch) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(**adapter.model_inputs(batch), position_ids=adapter.position_ids(batch.inputs)).logits


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_a_stray_window_in_a_llama_config_is_ignored_as_llama_ignores_it(name):
    adapter, batch = _long_batch(name)
    text_cfg = adapter.config.text_config
    assert text_cfg.model_type == "llama" and text_cfg.sliding_window == 32  # HF's tester values
    valid = ~batch.roles.padding
    assert int(valid.sum(dim=1).min()) > 32  # every prompt is longer than the window
    eng = Engine(adapter)
    assert eng.windows == [None] * eng.n_layers and set(eng.layer_types) == {"full_attention"}
    ref = _hf_logits(adapter, batch)
    torch.testing.assert_close(eng.run(batch).logits()[valid], ref[valid], atol=1e-4, rtol=0)
    # HF's model really ignores the field: its logits do not move when it is removed ...
    text_cfg.sliding_window = None
    torch.testing.assert_close(_hf_logits(adapter, batch), ref, atol=0, rtol=0)
    # ... and the prompts are long enough that windowing every layer, as the engine did, would show
    text_cfg.sliding_window = 32
    eng.windows, eng.layer_types = [32] * eng.n_layers, ["sliding_attention"] * eng.n_layers
    assert (eng.run(batch).logits()[valid] - ref[valid]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["mistral3-window", "gemma3-window"])
def test_a_window_the_model_applies_bites_and_the_engine_applies_it(name):
    """Mistral passes ``sliding_window=`` to its attention function on every layer; Gemma 3's sliding layers carry
    the window on the module. The engine equals HF there, and without the window it would not."""
    adapter, batch = _long_batch(name)
    valid = ~batch.roles.padding
    eng = Engine(adapter)
    assert 3 in eng.windows and int(valid.sum(dim=1).min()) > 3
    ref = _hf_logits(adapter, batch)
    torch.testing.assert_close(eng.run(batch).logits()[valid], ref[valid], atol=1e-4, rtol=0)
    full = Engine(adapter)
    full.windows = [None] * full.n_layers
    assert (full.run(batch).logits()[valid] - ref[valid]).abs().max() > 1e-2


def test_layer_windows_read_each_attention_module():
    """Llama ignores a stray window; Mistral slides every layer; Qwen2 slides the layers its own modules say; a
    config with no window makes nobody slide."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    small = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3)
    llama = LlamaConfig(sliding_window=32, **small)
    assert layer_windows(llama, [LlamaAttention(llama, i) for i in range(3)], "t") == (["full_attention"] * 3, [None] * 3)
    mistral = MistralConfig(sliding_window=5, **small)
    assert layer_windows(mistral, [MistralAttention(mistral, i) for i in range(3)], "t") == (["sliding_attention"] * 3, [5] * 3)
    mistral.sliding_window = None
    assert layer_windows(mistral, [MistralAttention(mistral, i) for i in range(3)], "t")[1] == [None] * 3
    qwen = Qwen2Config(sliding_window=7, use_sliding_window=True, max_window_layers=1, **small)
    types, windows = layer_windows(qwen, [Qwen2Attention(qwen, i) for i in range(3)], "t")
    assert types == qwen.layer_types and windows == [None if t == "full_attention" else 7 for t in qwen.layer_types]
    assert "sliding_attention" in types and "full_attention" in types
    off = Qwen2Config(sliding_window=7, use_sliding_window=False, **small)  # the released Qwen2 configs: a window, unused
    assert layer_windows(off, [Qwen2Attention(off, i) for i in range(3)], "t")[1] == [None] * 3


def test_a_layer_type_the_engine_cannot_mask_is_refused_by_name():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    from embedlens.errors import AdapterError

    cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2)
    cfg.layer_types = ["full_attention", "local_attention"]  # no such type: the engine cannot know its mask
    with pytest.raises(AdapterError, match="'local_attention'.*masks full_attention, sliding_attention and chunked_attention "
                                           "layers only"):
        layer_windows(cfg, [LlamaAttention(cfg, i) for i in range(2)], "t")


def test_a_window_that_does_not_fit_its_layer_type_names_the_layer_and_its_values():
    """A sliding layer whose module applies no window is named by its index, class and both values, not blamed on
    config.sliding_window alone (which is fine here)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from embedlens.errors import AdapterError

    qwen = Qwen2Config(sliding_window=7, use_sliding_window=True, max_window_layers=1, hidden_size=16,
                       num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3)
    attention = [Qwen2Attention(qwen, i) for i in range(3)]
    attention[2].sliding_window = 0
    with pytest.raises(AdapterError, match=r"decoder layer 2 \(Qwen2Attention, layer type 'sliding_attention'\) has window 0 "
                                           r"\(its own sliding_window: 0, config.sliding_window: 7\)"):
        layer_windows(qwen, attention, "t")


def test_a_hybrid_models_linear_attention_layers_are_refused_by_type_before_any_module_lookup():
    """Qwen3-Next's linear-attention layers have no ``self_attn``: the engine and the attention-flow reader refuse
    the layer type by name instead of reporting a missing module."""
    from types import SimpleNamespace

    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from embedlens.errors import AdapterError
    from embedlens.probes.attention_flow import llm_attention_rows

    cfg = Qwen3NextConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
                          layer_types=["linear_attention", "full_attention"], intermediate_size=16, vocab_size=32,
                          num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8,
                          linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=4, linear_value_head_dim=4,
                          attn_implementation="sdpa")
    model = Qwen3NextForCausalLM(cfg)
    assert not hasattr(model.model.layers[0], "self_attn")
    paths = SimpleNamespace(language_model="model", llm_layers="model.layers", llm_norm="model.norm", unembed="lm_head",
                            attn="self_attn", attn_norm="input_layernorm")
    adapter = SimpleNamespace(model=model, paths=paths, name="qwen3-next")
    refusal = "qwen3-next: config.layer_types has 'linear_attention'; the intervention engine masks full_attention, sliding_attention and chunked_attention"
    with pytest.raises(AdapterError, match=refusal):
        Engine(adapter)
    with pytest.raises(AdapterError, match=refusal):
        llm_attention_rows(adapter, None, 1, None, None)
