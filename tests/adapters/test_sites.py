"""Site activations read through nnsight equal Hugging Face's own outputs."""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters.capabilities import Capability
from embedlens.adapters.base import resolve_path
from embedlens.errors import AdapterError, UnknownNameError
from embedlens.sites import Site
from embedlens.tracing import collect
from tests.conftest import mixed_samples
from tests.support.packed import without_class_rows

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_llm_sites_equal_hf_hidden_states(adapter, padding_side):
    batch = adapter.encode(mixed_samples(adapter=adapter), padding_side=padding_side)
    n = adapter.n_llm_layers
    sites = ["llm.embed", "llm.norm", "llm.unembed"] + [f"llm.layers[{i}].in" for i in range(n)] + [f"llm.layers[{i}]" for i in range(n)]
    acts = collect(adapter, batch, sites)
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(batch), output_hidden_states=True)
    hs = ref.hidden_states  # [n + 1] x [batch, seq, d]; hs[i] enters layer i, hs[n] is after the final norm
    deep = _deepstack_features(adapter, batch)
    for i in range(n):
        # DeepStack (Qwen3-VL): HF's hidden_states[i] is decoder layer i - 1's output; the model adds the
        # features of vision layer deepstack_visual_indexes[i - 1] at the image tokens before layer i reads it
        added = deep[i - 1] if 0 < i <= len(deep) else 0.0
        torch.testing.assert_close(acts[Site("llm.layers", i, "in")], hs[i] + added, **TOL)
    for i in range(n - 1):
        torch.testing.assert_close(acts[Site("llm.layers", i)], hs[i + 1], **TOL)
    torch.testing.assert_close(acts[Site("llm.norm")], hs[n], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")], ref.logits, **TOL)
    # llm.embed is what the LM receives: the merged embeddings, visual rows = projector output
    emb = adapter.model.get_input_embeddings()(batch.input_ids)
    text = batch.roles.text
    torch.testing.assert_close(acts[Site("llm.embed")][text], emb[text], **TOL)


def _deepstack_features(adapter, batch) -> list:
    """Qwen3-VL's DeepStack features from the model's own `get_image_features`, scattered onto the image tokens
    (`[batch, seq, d]` each); none for other families."""
    if not adapter.has(Capability.DEEPSTACK):
        return []
    with torch.no_grad():
        out = adapter.model.model.get_image_features(batch.inputs["pixel_values"], batch.inputs["image_grid_thw"])
    image = batch.input_ids == adapter.image_token_id
    feats = []
    for per_image in out.deepstack_features:
        full = torch.zeros(*image.shape, per_image[0].shape[-1])
        full[image] = torch.cat(per_image)
        feats.append(full)
    return feats


def test_vision_sites_equal_hf_hidden_states(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter))
    n = adapter.n_vision_layers
    acts = collect(adapter, batch, [f"vision.layers[{i}]" for i in range(n)] + ["vision.features", "projector"])
    pv = batch.inputs["pixel_values"]
    if pv.dim() == 5:  # anyres: [batch, max_tiles, ...], padded; keep each sample's real tiles
        fr = batch.roles.feature_row
        pv = torch.cat([pv[b, : int(fr[b].max() - fr[b][fr[b] >= 0].min()) + 1] for b in range(pv.shape[0])])
    vis = resolve_path(adapter.model, adapter.paths.vision_embed.rsplit(".", 1)[0])  # the tower
    # GLM-4V: the tower merges its blocks' rows itself (no separate encoder module): HF's last hidden state is the
    # merged rows, so the last block's output is hooked
    tower_merges = (adapter.has(Capability.PACKED_TOWER) and adapter.has(Capability.PRE_PROJECTOR_MERGE)
                    and getattr(vis, "encoder", None) is None and "image_token_pooling" not in batch.inputs)  # not Molmo2's
    last = {}
    if tower_merges:
        last_hook = resolve_path(adapter.model, adapter.paths.vision_layers)[n - 1].register_forward_hook(
            lambda m, a, o: last.__setitem__("out", o[None]))
    with torch.no_grad():
        if adapter.has(Capability.PACKED_TOWER):  # Qwen-VL, Pixtral, Gemma 4: the batch's patches as one sequence, split by image sizes
            encoded = {}
            enc = getattr(vis, "encoder", None)
            handle = enc.register_forward_hook(lambda m, a, o: encoded.update(h=o.last_hidden_state)) if enc is not None else None
            try:
                out = vis(pv, **adapter.tower_kwargs(batch.inputs), output_hidden_states=True)
            finally:
                if handle is not None:
                    handle.remove()
            if "image_token_pooling" in batch.inputs:  # Molmo2: its crops packed; its features, the adapter's pooled rows
                seen = {}
                pooled = adapter.model.model.multi_modal_projector.image_projector.register_forward_hook(
                    lambda m, a, o: seen.update(x=a[0]))
                try:
                    adapter.model.model.get_image_features(**{k: batch.inputs[k] for k in (
                        "pixel_values", "image_token_pooling", "image_grids", "image_num_crops")})
                finally:
                    pooled.remove()
                out.hidden_states = tuple(h.reshape(1, -1, h.shape[-1]) for h in out.hidden_states)
                out.last_hidden_state = seen["x"][None]
            elif "image_position_ids" in batch.inputs:  # Gemma 4
                # its hidden_states end with the pooled features in place of the last layer's output (that one is its
                # encoder's own output); the sites' documented view (`site_value`) packs the padded image rows, and
                # its last_hidden_state is the pooler's output, the features
                out.hidden_states = (*out.hidden_states[:-1], encoded["h"])
                out.hidden_states = tuple(adapter.site_value(Site("vision.layers", 0), h, batch.inputs) for h in out.hidden_states)
                out.last_hidden_state = adapter.site_value(Site("vision.features"), out.last_hidden_state, batch.inputs)
            else:
                out.hidden_states = tuple(h if h.dim() == 3 else h[None] for h in out.hidden_states)  # Qwen-VL's have no batch dimension
                out.last_hidden_state = out.last_hidden_state if out.last_hidden_state.dim() == 3 else out.last_hidden_state[None]
        else:
            out = vis(pv, output_hidden_states=True)
            if type(vis).__name__ == "Llama4VisionModel":
                # written from Llama4VisionModel.forward: the class row comes after the patches (the sites leave it out,
                # as the model drops it before the pixel shuffle), which its own vision adapter runs: its
                # last_hidden_state is the merged features
                out.hidden_states = tuple(h[:, :-1] for h in out.hidden_states)
    if tower_merges:
        last_hook.remove()
        torch.testing.assert_close(out.hidden_states[n], out.last_hidden_state, atol=0, rtol=0)
        out.hidden_states = (*out.hidden_states[:n], last["out"])
    for i in range(n):
        torch.testing.assert_close(acts[Site("vision.layers", i)], without_class_rows(out.hidden_states[i + 1], batch.inputs), **TOL)
    # vision.features: the family's feature layer and CLS rule, then the projector
    cfg = adapter.config
    # Molmo2's config names its feature layers too, but its features are the adapter's pooled rows (last_hidden_state)
    layer = None if "image_token_pooling" in batch.inputs else getattr(cfg, "vision_feature_layer", None)
    feats = out.last_hidden_state if layer is None else out.hidden_states[layer]
    feats = feats[:, adapter.n_prefix_tokens:]
    (gh, gw), (bh, bw) = adapter.grid(), adapter.patch_block
    if adapter.has(Capability.PRE_PROJECTOR_MERGE) and not adapter.has(Capability.PACKED_TOWER) and feats.shape[1] != gh * gw:
        # InternVL: the model's own pixel shuffle runs between the tower's output and the projector
        n = feats.shape[0]
        merged = adapter.model.model.pixel_shuffle(feats.reshape(n, gh * bh, gw * bw, -1), scale_factor=cfg.downsample_ratio)
        feats = merged.reshape(n, gh * gw, -1)
    torch.testing.assert_close(acts[Site("vision.features")], feats, **TOL)
    merger = resolve_path(adapter.model, adapter.paths.projector)
    proj = merger(feats[0], *adapter.projector_args(batch.inputs))[None] if adapter.has(Capability.PACKED_TOWER) else merger(feats)
    torch.testing.assert_close(acts[Site("projector")], proj, **TOL)


def test_attn_and_mlp_updates_sum_to_the_layer_output(adapter):
    batch = adapter.encode(mixed_samples(adapter=adapter)[:2])
    third = {}  # Gemma 4's per-layer-input update, where the model has one (`ModulePaths.per_layer_out`)
    path = adapter.paths.per_layer_out
    layer = resolve_path(adapter.model, adapter.paths.llm_layers)[1]
    handle = resolve_path(layer, path).register_forward_hook(lambda m, a, o: third.update(x=o)) if path else None
    try:
        acts = collect(adapter, batch, ["llm.layers[1].in", "llm.layers[1].attn", "llm.layers[1].mlp", "llm.layers[1]"])
    finally:
        if handle is not None:
            handle.remove()
    h_in, attn, mlp, out = (acts[Site("llm.layers", 1, s)] for s in ("in", "attn", "mlp", None))
    scalar = getattr(layer, "layer_scalar", 1.0)  # Gemma 4 scales each layer's output (1 until a checkpoint sets it)
    torch.testing.assert_close((h_in + attn + mlp + third.get("x", 0.0)) * scalar, out, **TOL)


def test_site_errors(adapter):
    with pytest.raises(AdapterError, match=r"layer 40 is out of range .*0\.\.3"):
        adapter.resolve("llm.layers[40]")
    with pytest.raises(UnknownNameError, match="Did you mean"):
        Site.parse("llm.layayers[1]")
    with pytest.raises(AdapterError, match="needs a layer index"):
        Site.parse("vision.layers")
