"""The token-role map against planted ground truth and the model's own code."""

from __future__ import annotations

import pytest
import torch

from embedlens.adapters.capabilities import Capability
from embedlens.adapters.base import resolve_path
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.tracing import collect
from tests.conftest import mixed_samples


def _samples(adapter):
    return mixed_samples(n_images_last=2 if not adapter.has(Capability.SINGLE_IMAGE) else 1, adapter=adapter)


def _n_features(adapter, batch) -> int:
    """Rows of image features the model itself scatters into the sequence."""
    keys = ("pixel_values", "image_sizes", "batch_num_images", "pixel_attention_mask", "image_grid_thw", "image_position_ids",
            "image_token_pooling", "image_grids", "image_num_crops")  # the last three: Molmo2's
    kwargs = {k: v for k, v in batch.inputs.items() if k in keys}
    with torch.no_grad():
        # Llama 4's top-level model holds the tower itself (no inner `model`)
        feats = getattr(adapter.model, "model", adapter.model).get_image_features(**kwargs).pooler_output
    return sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_visual_positions_hold_image_tokens(adapter, padding_side):
    batch = adapter.encode(_samples(adapter), padding_side=padding_side)
    roles, ids = batch.roles, batch.input_ids
    assert (ids[roles.image_span] == adapter.image_token_id).all()
    assert not (ids[~roles.image_span] == adapter.image_token_id).any()
    assert int(roles.image_span.sum()) == _n_features(adapter, batch)
    pad = ~batch.inputs["attention_mask"].bool()
    assert torch.equal(roles.padding, pad)
    if padding_side == "left":
        assert roles.padding[:, 0].any()
    else:
        assert roles.padding[:, -1].any()
    # every sample: images in order, each with a full grid of tile 0 (native-resolution families: the image's own)
    grids = iter(adapter.image_grids(batch.inputs))
    for b, s in enumerate(batch.samples):
        assert roles.n_images(b) == len(s.images)
        for i in range(len(s.images)):
            assert roles.grid_shape(b, i) == next(grids)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_text_spans_decode_to_what_was_asked(adapter, padding_side):
    samples = _samples(adapter)
    batch = adapter.encode(samples, padding_side=padding_side)
    roles, ids, tok = batch.roles, batch.input_ids, adapter.tokenizer
    for b, s in enumerate(samples):
        assert tok.decode(ids[b][roles.question[b]]).replace(" ", "") == s.question.replace(" ", "")
        answer = tok.decode(ids[b][roles.answer[b]], skip_special_tokens=True).replace(" ", "")
        assert answer == (s.answer or "").replace(" ", "")
        last = int(roles.last_index[b])
        assert roles.last[b].sum() == 1 and roles.last[b, last]
        # the last prompt token comes right before the answer, or ends the sequence
        if s.answer:
            assert roles.answer[b, last + 1]
        else:
            assert last == int(batch.inputs["attention_mask"][b].nonzero().max())
        assert roles.bos[b].sum() == 1
        assert ids[b][roles.bos[b]].item() == tok.bos_token_id
    assert not (roles.text & roles.visual).any()


def test_newline_tokens_only_where_the_family_has_them(adapter):
    batch = adapter.encode(_samples(adapter))
    assert bool(batch.roles.image_newline.any()) == adapter.has(Capability.IMAGE_NEWLINE)


def test_row_col_match_the_patch_embedding(adapter):
    """Change one pixel patch inside the block of patches a token stands for (one patch where
    `patch_block` is 1 x 1): at the patch-embedding output (before attention mixes tokens)
    exactly that patch changes; then change that patch's row of the projector input: of the
    projector output (the model's own merging, e.g. Idefics3's pixel shuffle) exactly the
    token the map names changes."""
    if adapter.name == "molmo2":
        # Molmo2: tokens pool patches of the low-res crop or of several high-res crops (the processor's pooling table)
        from tests.adapters.test_molmo2 import patch_blocks_by_perturbation

        return patch_blocks_by_perturbation(adapter)
    if adapter.has(Capability.PACKED_TOWER):
        return _packed_patch_blocks(adapter)
    batch = adapter.encode(_samples(adapter)[:2])
    roles = batch.roles
    vt = roles.visual_tokens()
    prefix = adapter.n_prefix_tokens
    ps = adapter.config.vision_config.patch_size
    ps = ps[0] if isinstance(ps, (list, tuple)) else ps  # InternViT gives (h, w); every tower here is square
    bh, bw = adapter.patch_block
    gh, gw = adapter.grid()
    proj = resolve_path(adapter.model, adapter.paths.projector)
    base = collect(adapter, batch, ["vision.embed", "projector"])
    pv = batch.inputs["pixel_values"]
    # pixel_values rows in the vision batch's order (families that pad with blank sub-images drop them, as the model does)
    flat_rows = pv.view(-1, *pv.shape[-3:])
    real = (flat_rows != 0).flatten(1).any(1).nonzero().flatten()
    checked = 0
    for k, t in enumerate(torch.linspace(0, len(vt["row"]) - 1, 7).long().tolist()):
        fr, r, c = int(vt["feature_row"][t]), int(vt["row"][t]), int(vt["col"][t])
        i, j = k % bh, (k // bh) % bw  # a different patch of the block each time
        pr, pc = r * bh + i, c * bw + j
        patch = pr * gw * bw + pc  # index in the tile's patch sequence
        changed = pv.clone()
        flat = changed.view(-1, *pv.shape[-3:])
        flat[real[fr], :, pr * ps : (pr + 1) * ps, pc * ps : (pc + 1) * ps] += 1.0
        batch.inputs["pixel_values"] = changed
        try:
            emb = collect(adapter, batch, ["vision.embed"])[Site("vision.embed")]
        finally:
            batch.inputs["pixel_values"] = pv
        where = (emb - base[Site("vision.embed")]).abs().amax(-1).nonzero().tolist()  # [vision rows, tokens]
        assert where == [[fr, prefix + patch]], (t, where)
        assert patch in adapter.patch_indices(vt["feature_col"][t : t + 1], batch.inputs)[0].tolist()

        if adapter.has(Capability.PRE_PROJECTOR_MERGE):
            # the merge runs between tower and projector (InternVL): change the tower layer the features come from
            handle = _feature_layer(adapter).register_forward_hook(lambda m, a, o: _bumped(o, fr, prefix + patch))
        else:
            handle = proj.register_forward_pre_hook(lambda m, args: _bumped(args, fr, patch))
        try:
            out = collect(adapter, batch, ["projector"])[Site("projector")]
        finally:
            handle.remove()
        where = (out - base[Site("projector")]).abs().amax(-1).nonzero().tolist()
        assert where == [[fr, int(vt["feature_col"][t])]], (t, where)
        assert int(vt["feature_col"][t]) == r * gw + c and 0 <= r < gh
        checked += 1
    assert checked == 7


def qwen_patch_row(image_start: int, grid_w: int, pr: int, pc: int, m: int = 2) -> int:
    """The row of `pixel_values` that holds patch (pr, pc) of an image whose patches start at `image_start`
    and whose grid is `grid_w` patches wide, written out from `Qwen2VLImageProcessorPil.patchify`: 2 x 2 blocks
    in row-major order, the four patches of a block in row-major order."""
    block = (pr // m) * (grid_w // m) + pc // m
    return image_start + block * m * m + (pr % m) * m + pc % m


def _packed_patch_blocks(adapter):
    """`test_row_col_match_the_patch_embedding` for a packed tower. Qwen-VL: `pixel_values` has one row per
    patch, so the patch at (row, col) of an image's patch grid is perturbed through the processor's own
    layout (`qwen_patch_row`; `tests/adapters/test_qwen2_vl.py` proves that layout on image pixels). Pixtral:
    `pixel_values` holds each image's pixels (padded), so the patch's pixels are perturbed in place."""
    batch = adapter.encode(_samples(adapter)[:2])
    vt = batch.roles.visual_tokens()
    bh, bw = adapter.patch_block
    thw = batch.inputs.get("image_grid_thw")
    if thw is not None:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), thw.prod(-1).cumsum(0)])
    image_of = torch.cumsum(torch.tensor([0] + [len(s.images) for s in batch.samples]), 0)  # first global image per sample
    proj = resolve_path(adapter.model, adapter.paths.projector)
    base = collect(adapter, batch, ["vision.embed", "projector"])
    pv = batch.inputs["pixel_values"]
    for k, t in enumerate(torch.linspace(0, len(vt["row"]) - 1, 7).long().tolist()):
        g = int(image_of[vt["sample"][t]] + vt["image"][t])  # the image, counted over the batch
        r, c, fc = int(vt["row"][t]), int(vt["col"][t]), int(vt["feature_col"][t])
        i, j = k % bh, (k // bh) % bw
        changed = pv.clone()
        if thw is not None:
            changed[qwen_patch_row(int(starts[g]), int(thw[g, 2]), r * bh + i, c * bw + j, bh)] += 1.0
        elif "image_position_ids" in batch.inputs:  # Gemma 4: each image's patches row-major, one row per patch
            pw = int(batch.inputs["image_position_ids"][g, :, 0].max()) + 1
            changed[g, (r * bh + i) * pw + c * bw + j] += 1.0
        else:
            ps = adapter.config.vision_config.patch_size
            pr, pc = r * bh + i, c * bw + j
            changed[g, :, pr * ps : (pr + 1) * ps, pc * ps : (pc + 1) * ps] += 1.0
        batch.inputs["pixel_values"] = changed
        try:
            emb = collect(adapter, batch, ["vision.embed"])[Site("vision.embed")]
        finally:
            batch.inputs["pixel_values"] = pv
        where = (emb - base[Site("vision.embed")]).abs().amax(-1).nonzero().tolist()
        assert len(where) == 1 and where[0][0] == 0, (t, where)
        site_row = where[0][1]  # where the site holds that patch (Qwen2.5-VL: in window order)
        assert site_row in adapter.patch_indices(vt["feature_col"][t : t + 1], batch.inputs)[0].tolist(), (t, site_row)
        if adapter.has(Capability.PRE_PROJECTOR_MERGE):
            # the tower merges before the projector (Gemma 4's pooler, GLM-4V's strided convolution): raise that patch
            # in the last layer's output (Gemma 4's padded image rows: the site_row-th real patch) and only its token's
            # feature may change
            if "image_position_ids" in batch.inputs:
                real = (batch.inputs["image_position_ids"] >= 0).all(-1).flatten().nonzero().flatten()
                flat = int(real[site_row])
            else:
                flat = site_row
            layer = resolve_path(adapter.model, adapter.paths.vision_layers)[-1]

            def bump_patch(m, args, out):
                h = (out[0] if isinstance(out, tuple) else out).clone()
                h.view(-1, h.shape[-1])[flat] += 1.0
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handle = layer.register_forward_hook(bump_patch)
        else:
            # the projector's input: `[patches, d]` (Qwen-VL's merger, Mistral 3's projector) or `[1, patches, d]` (LLaVA's)
            handle = proj.register_forward_pre_hook(
                lambda m, args: (_bumped(args[0].reshape(1, -1, args[0].shape[-1]), 0, site_row).reshape(args[0].shape), *args[1:]))
        try:
            out = collect(adapter, batch, ["projector"])[Site("projector")]
        finally:
            handle.remove()
        where = (out - base[Site("projector")]).abs().amax(-1).nonzero().tolist()
        assert where == [[0, fc]], (t, where)


def _bumped(x, row: int, col: int):
    """`x` (a tensor, or a tuple whose first item is one) with entry [row, col] raised by 1."""
    first = (x[0] if isinstance(x, tuple) else x).clone()
    first[row, col] += 1.0
    return (first, *x[1:]) if isinstance(x, tuple) else first


def _feature_layer(adapter):
    """The vision layer whose output the family's features are taken from."""
    layers = resolve_path(adapter.model, adapter.paths.vision_layers)
    f = getattr(adapter.config, "vision_feature_layer", -1)
    return layers[len(layers) + f if f < 0 else f - 1]


def test_sequence_positions_receive_the_named_features(adapter):
    """Plant a code for every (vision row, feature index) in the projector output and let the
    model's own merging (packing, unpadding, newlines) place it: each visual position
    must hold the code of the patch the map names."""
    batch = adapter.encode(_samples(adapter), padding_side="left")
    proj = resolve_path(adapter.model, adapter.paths.projector)

    def plant(module, args, output):
        packed = output.dim() == 2  # a packed tower (Qwen-VL): one row of tokens, no batch dimension
        out = output[None] if packed else output
        rows, toks = out.shape[0], out.shape[1]
        code = torch.zeros_like(out)
        code[..., 0] = torch.arange(rows, dtype=output.dtype)[:, None] + 1
        code[..., 1] = torch.arange(toks, dtype=output.dtype)[None, :] + 1
        code[..., 2] = 1.0  # carries whatever scale the family applies after the projector
        return code[0] if packed else code

    handle = proj.register_forward_hook(plant)
    try:
        emb = collect(adapter, batch, ["llm.embed"])[Site("llm.embed")]
    finally:
        handle.remove()
    roles = batch.roles
    vis = emb[roles.visual]
    got = (vis[:, 0:2] / vis[:, 2:3]).round().long() - 1
    assert torch.equal(got[:, 0], roles.feature_row[roles.visual])
    assert torch.equal(got[:, 1], roles.feature_col[roles.visual])


def test_role_kinds_partition_every_position(adapter):
    batch = adapter.encode(_samples(adapter))
    roles, ids, tok = batch.roles, batch.input_ids, adapter.tokenizer
    total = sum(roles._is(r).long() for r in Role)
    assert (total == 1).all()
    # special roles hold the tokenizer's special ids, and text never does
    special = torch.tensor(sorted(adapter.special_token_ids()))
    assert torch.isin(ids[roles.special], special).all()
    assert not torch.isin(ids[roles.text], special[special != tok.unk_token_id]).any()
    assert torch.equal(roles.bos, (ids == tok.bos_token_id) & ~roles.padding)


def test_image_tokens_have_no_frame(adapter):
    # frame is a video token's temporal index: every position of an image-only batch is -1
    roles = adapter.encode(_samples(adapter)).roles
    assert torch.equal(roles.frame, torch.full_like(roles.kind, -1))
    assert set(roles.visual_tokens()) >= {"frame", "row", "col"}
