"""LLaVA-OneVision video: pixel values against HF's video processing written out with HF's own PIL-side functions,
the pooled patch support against the model's pooling, each video token on its true frame and patch (one frame's
patch perturbed), the features at each visual position equal to the row HF scatters there, sites equal to HF's
own forward, and the engine's logits and pruning equal to HF's, on embedlens's tiny model and HF's tester
configuration (its 2 x 2 patch grid pooled to one token a frame, and a 3 x 3 grid, whose pooling overlaps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
from transformers.image_transforms import normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from embedlens.adapters import LlavaOnevisionAdapter, load_model, wrap_model
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.llava_onevision import OnevisionImageProcessor
from embedlens.adapters.llava_onevision_video import frames_to_pixels, pooled_support, video_settings
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.interventions import Engine
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.testing.images import shapes
from embedlens.tokenizer import build_tokenizer
from embedlens.tracing import collect
from embedlens.video import Video
from tests.support.hf_testers import ONEVISION_TESTER, TESTER_CONFIGS

TOL = dict(atol=1e-5, rtol=1e-4)
N_FRAMES = 3


def _odd_tester(seed: int):
    """The OneVision tester's values with 24-px frames: a 3 x 3 patch grid, which the model pools (bilinear) to
    2 x 2 tokens that share the middle patch row and column."""
    t, tok = ONEVISION_TESTER, build_tokenizer()
    vision = SiglipVisionConfig(**{**t["vision"], "image_size": 24})
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(vocab_size=len(tok), **t["text"], **ids),
                                  image_token_id=tok.image_token_id, video_token_id=tok.convert_tokens_to_ids("<video>"),
                                  **{**t["top"], "image_grid_pinpoints": [[24, 24]]})
    torch.manual_seed(seed)
    processor = OnevisionImageProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 24, "width": 24}, image_grid_pinpoints=[[24, 24]],
                                                        image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, num_image_tokens=9, vision_feature_select_strategy="full", chat_template=tok.chat_template)
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor


def _frames(n: int, side: int | tuple[int, int], seed: int = 0) -> list[Image.Image]:
    h, w = (side, side) if isinstance(side, int) else side
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=["tiny", "tester", "tester-odd"])
def ov(request):
    if request.param == "tiny":
        adapter = load_model("tiny:llava_onevision")
    elif request.param == "tester":
        adapter = wrap_model(*TESTER_CONFIGS["llava_onevision"].build(0))
    else:
        adapter = wrap_model(*_odd_tester(0))
    assert type(adapter) is LlavaOnevisionAdapter and adapter.has(Capability.VIDEO)
    adapter.side = int(adapter.config.vision_config.image_size)
    return adapter


def _batch(ov, padding_side="left", n=2, frames=None):
    questions = ["count the shapes", "what?", "is it red?"]
    samples = [Sample(video=frames or _frames(N_FRAMES, ov.side, seed=i), question=questions[i], id=f"v{i}") for i in range(n)]
    return ov.encode(samples, padding_side=padding_side)


def _cells(ov) -> int:
    """Video tokens per side of a frame: ceil(patches / 2), written out from the config."""
    return math.ceil(ov.side // ov.config.vision_config.patch_size / 2)


def _hf_video_features(ov, batch) -> torch.Tensor:
    """`[videos, tokens, d]`: what HF's model scatters into the video positions (frames' pooled tokens, newline)."""
    with torch.no_grad():
        return ov.model.model.get_video_features(batch.inputs["pixel_values_videos"]).pooler_output


def test_pixel_values_equal_hfs_video_processing_written_out(ov, tmp_path):
    """HF's LlavaOnevisionVideoProcessor: resize every frame to {height, width} = the tower's size (bicubic, aspect
    not kept), rescale by 1/255, normalise; written out with transformers' numpy functions (image_transforms) on
    frames of another size and shape, and on tower-size frames (not resized: equal to float rounding)."""
    s = ov.side
    ip = ov.processor.image_processor
    settings = video_settings(ov.processor)  # no video processor config: the image processor's normalisation
    assert settings.image_mean == tuple(ip.image_mean) and settings.image_std == tuple(ip.image_std)
    assert settings.resample == PILImageResampling.BICUBIC and settings.rescale_factor == pytest.approx(1 / 255)

    def hf(frames, mean, std):
        out = []
        for f in frames:
            x = np.asarray(f).transpose(2, 0, 1)  # channels first, as the processor's frames
            x = resize(x, (s, s), resample=PILImageResampling.BICUBIC, data_format=ChannelDimension.FIRST,
                       input_data_format=ChannelDimension.FIRST)
            x = rescale(x, 1 / 255, input_data_format=ChannelDimension.FIRST)
            out.append(normalize(x, mean, std, input_data_format=ChannelDimension.FIRST))
        return torch.from_numpy(np.stack(out)).float()

    for shape in ((s, s), (s + 9, 2 * s + 3), (s // 2 + 1, s)):
        frames = _frames(2, shape, seed=sum(shape))
        torch.testing.assert_close(frames_to_pixels(Video(frames), settings, s), hf(frames, ip.image_mean, ip.image_std),
                                   atol=2e-6, rtol=0)
    batch = _batch(ov, frames=_frames(N_FRAMES, (s + 5, s)))
    assert tuple(batch.inputs["pixel_values_videos"].shape) == (2, N_FRAMES, 3, s, s)
    torch.testing.assert_close(batch.inputs["pixel_values_videos"][0], hf(_frames(N_FRAMES, (s + 5, s)), ip.image_mean, ip.image_std),
                               atol=2e-6, rtol=0)

    # a checkpoint's own video processor config (here CLIP's normalisation, the class default) is read as HF reads it
    folder = tmp_path / "ckpt"
    ov.processor.save_pretrained(folder)
    clip = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 384, "width": 384}, **clip}))
    processor = LlavaOnevisionAdapter.load_processor(str(folder))
    got = video_settings(processor)
    assert got.image_mean == tuple(clip["image_mean"]) and got.image_std == tuple(clip["image_std"])
    frames = _frames(2, (s + 3, s - 1), seed=7)
    torch.testing.assert_close(frames_to_pixels(Video(frames), got, s), hf(frames, clip["image_mean"], clip["image_std"]),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 27])
def test_pooled_support_is_what_the_models_pooling_reads(n):
    """For every patch of an n x n grid, a one-hot grid through the model's own `apply_pooling` reaches exactly
    the pooled tokens whose `pooled_support` holds that patch (the 2 x 2 the bilinear pooling reads)."""
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=n * 2, patch_size=2))
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    pool = LlavaOnevisionModel.apply_pooling
    holder = type("H", (), {"config": config})()
    m, support = pooled_support(n)
    one_hot = torch.eye(n * n).reshape(n * n, n * n, 1)  # patch p lit in grid p
    reached = pool(holder, one_hot)[..., 0].abs() > 0  # [patches, m * m]
    rows, cols = support[:, None, :, None], support[None, :, None, :]  # [m, m, 2, 2] block of token (i, j)
    block = (rows * n + cols).reshape(m * m, 4)
    want = torch.zeros(n * n, m * m, dtype=torch.bool)
    for t in range(m * m):
        want[block[t], t] = True
    assert torch.equal(reached, want)


def test_role_map_puts_each_token_on_its_frame_and_pooled_cell(ov):
    batch = _batch(ov)
    roles, ids = batch.roles, batch.input_ids
    g = _cells(ov)
    assert not (ids == ov.config.image_token_id).any()
    for b in range(2):
        span = (ids[b] == ov.config.video_token_id).nonzero().flatten()
        assert len(span) == N_FRAMES * g * g + 1 and torch.equal(span, torch.arange(span[0], span[0] + len(span)))
        k = torch.arange(N_FRAMES * g * g)
        vis = span[:-1]
        assert (roles.kind[b, vis] == Role.VISUAL).all() and roles.kind[b, span[-1]] == Role.IMAGE_NEWLINE
        assert torch.equal(roles.frame[b, vis], k // (g * g))
        assert torch.equal(roles.row[b, vis], k % (g * g) // g) and torch.equal(roles.col[b, vis], k % g)
        assert torch.equal(roles.feature_row[b, vis], b * N_FRAMES + k // (g * g))
        assert torch.equal(roles.feature_col[b, vis], k % (g * g)) and (roles.image[b, vis] == 0).all()
        assert roles.frame[b, span[-1]] == -1 and (roles.frame[b][roles.kind[b] != Role.VISUAL] == -1).all()
    assert ov.tokenizer.decode(ids[0][roles.question[0]]).replace(" ", "") == "counttheshapes"


def test_one_frames_patch_reaches_exactly_its_token(ov):
    """Invert one patch of one frame: the tower's patch embedding (`vision.embed`) changes in exactly one row, the
    frame's tower row and the patch the role map's token at (frame, row // 2, col // 2) pools; in the LLM's input
    every token of that frame changes (the tower mixes a frame's patches) and no token of another frame."""
    p = int(ov.config.vision_config.patch_size)
    n = ov.side // p
    frames = _frames(N_FRAMES, ov.side, seed=3)
    enc = lambda fr: ov.encode([Sample(video=fr, question="what moves?", id="v")])  # noqa: E731
    ref = enc(frames)
    base = collect(ov, ref, ["vision.embed", "llm.embed"])
    vt = ref.roles.visual_tokens()
    for f, pr, pc in ((0, 0, 0), (1, n - 1, 1 % n), (2, 1 % n, n - 1)):
        arr = np.asarray(frames[f]).copy()
        arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p] = 255 - arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]
        batch = enc(frames[:f] + [Image.fromarray(arr)] + frames[f + 1:])
        got = collect(ov, batch, ["vision.embed", "llm.embed"])
        changed = (got[Site("vision.embed")] - base[Site("vision.embed")]).abs().amax(-1).gt(1e-6).nonzero().tolist()
        assert changed == [[f, pr * n + pc]]
        token = (vt["frame"] == f) & (vt["row"] == pr // 2) & (vt["col"] == pc // 2)
        assert int(token.sum()) == 1 and int(vt["feature_row"][token]) == f
        assert pr * n + pc in ov.patch_indices(vt["feature_col"][token], batch.inputs)[0].tolist()
        if n % 2 == 0:  # even grids pool disjoint 2 x 2 blocks: no other token of the frame reads that patch
            others = (vt["frame"] == f) & ~token
            assert not (ov.patch_indices(vt["feature_col"][others], batch.inputs) == pr * n + pc).any()
        moved = (got[Site("llm.embed")][0] - base[Site("llm.embed")][0]).abs().amax(-1).gt(1e-6)  # [seq]
        frame = ref.roles.frame[0]
        assert moved[frame == f].all() and not moved[frame != f].any()


def test_each_position_receives_the_row_hf_scatters_there(ov):
    """`llm.embed` at each video token is HF's `get_video_features` row for (frame, pooled cell), the role map's
    (feature_row, feature_col) row of the pooled `projector` site, and on even grids the mean of the projector on
    the 2 x 2 patches `patch_indices` names; the newline position holds the model's `image_newline`."""
    batch = _batch(ov, padding_side="right")
    acts = collect(ov, batch, ["vision.features", "projector", "llm.embed"])
    vt = batch.roles.visual_tokens()
    emb = acts[Site("llm.embed")][vt["sample"], vt["position"]]
    hf = _hf_video_features(ov, batch)  # [videos, F * cells + 1, d]
    cells = hf.shape[1] // N_FRAMES
    torch.testing.assert_close(emb, hf[vt["sample"], vt["frame"] * cells + vt["feature_col"]], atol=0, rtol=0)
    torch.testing.assert_close(emb, acts[Site("projector")][vt["feature_row"], vt["feature_col"]], atol=0, rtol=0)
    newline = batch.roles.kind == Role.IMAGE_NEWLINE
    assert int(newline.sum()) == 2
    torch.testing.assert_close(acts[Site("llm.embed")][newline], ov.model.model.image_newline.expand(2, -1), atol=0, rtol=0)
    if (ov.side // ov.config.vision_config.patch_size) % 2 == 0:
        patches = acts[Site("vision.features")][vt["feature_row"][:, None], ov.patch_indices(vt["feature_col"], batch.inputs)]
        with torch.no_grad():
            mean = ov.model.model.multi_modal_projector(patches).mean(1)
        torch.testing.assert_close(emb, mean, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sites_equal_hf_hidden_states(ov, padding_side):
    batch = _batch(ov, padding_side=padding_side)
    n = ov.n_llm_layers
    acts = collect(ov, batch, [f"vision.layers[{i}]" for i in range(ov.n_vision_layers)]
                   + [f"llm.layers[{i}]" for i in range(n)] + ["llm.embed", "llm.unembed"])
    with torch.no_grad():
        out = ov.model(**ov.model_inputs(batch), output_hidden_states=True)
        pv = batch.inputs["pixel_values_videos"]
        tower = ov.model.model.vision_tower(pv.flatten(0, 1), output_hidden_states=True)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(acts[Site("llm.embed")][valid], out.hidden_states[0][valid], **TOL)
    for i in range(n - 1):  # the last layer's output is normed in HF's hidden_states
        torch.testing.assert_close(acts[Site("llm.layers", i)][valid], out.hidden_states[i + 1][valid], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")][valid], out.logits[valid], **TOL)
    for i in range(ov.n_vision_layers):
        torch.testing.assert_close(acts[Site("vision.layers", i)], tower.hidden_states[i + 1], **TOL)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_engine_logits_equal_hf(ov, padding_side):
    batch = _batch(ov, padding_side=padding_side)
    with torch.no_grad():
        ref = ov.model(**ov.model_inputs(batch)).logits
    out = Engine(ov).run(batch)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits()[valid], ref[valid], **TOL)
    if padding_side == "left":
        ours = Engine(ov).run(batch, cache=True).generate(3)
        with torch.no_grad():
            hf = ov.model.generate(**ov.model_inputs(batch), max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
        # HF pads a row after its end-of-sequence token; the engine keeps generating: compare up to it
        eos = hf == ov.tokenizer.eos_token_id
        upto = (eos.long().cumsum(1) - eos.long()) == 0
        assert torch.equal(ours[upto], hf[upto])


def test_pruning_one_frame_equals_cutting_it_out(ov):
    """Pruning `visual and frame == 1` gives the logits of HF's language model on the sequence with those tokens
    cut out, every other token at its original position."""
    from embedlens.interventions.prune import Prune

    batch = _batch(ov, n=1)
    engine = Engine(ov)
    pruned = engine.run(batch, [Prune(tokens="visual and frame == 1")])
    cut = ((batch.roles.frame == 1) & batch.roles.visual)[0]
    assert int(cut.sum()) == _cells(ov) ** 2
    keep = ~cut
    ctx = engine.context(batch)
    with torch.no_grad():
        ref = ov.model.model.language_model(inputs_embeds=ctx.embeds[:, keep], position_ids=ctx.positions[:, keep])
        logits = ov.model.lm_head(ref.last_hidden_state)
    torch.testing.assert_close(pruned.last_logits(), logits[:, -1], **TOL)
    assert torch.equal(ctx.positions[0], torch.arange(batch.input_ids.shape[1]))


def test_video_errors(ov):
    s = ov.side
    with pytest.raises(InputError, match=r"image samples or video samples, not both; .*\(set batch_size: 1"):
        ov.encode([Sample([shapes(32)], question="q", id="i"), Sample(video=_frames(2, s), question="q", id="v")])
    with pytest.raises(InputError, match=r"one frame count; got \{'a': 2, 'b': 3\}"):
        ov.encode([Sample(video=_frames(2, s), question="q", id="a"), Sample(video=_frames(3, s), question="q", id="b")])
    with pytest.raises(InputError, match="one video placeholder"):
        ov.encode([Sample(video=_frames(2, s), prompt="no placeholder <image>", id="v")])
    # a full prompt with the video placeholder is kept verbatim
    batch = ov.encode([Sample(video=_frames(2, s), prompt="look <video> now", id="v")])
    assert int((batch.input_ids == ov.config.video_token_id).sum()) == int(batch.roles.visual.sum()) + 1


def test_each_frame_map_holds_that_frames_pixels_and_tokens():
    """FirstImage (every token map's source): one entry per kept frame, with that frame's tokens over its pixels,
    put back in 0..1 from the video processor's normalisation (here a checkpoint's CLIP one, not the image
    processor's 0.5)."""
    from embedlens.probes._util import FirstImage

    ov = load_model("tiny:llava_onevision")
    ov.processor.video_config = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    try:
        frames = _frames(N_FRAMES, 32, seed=5)
        batch = ov.encode([Sample(video=frames, question="what?", id="a"), Sample(video=_frames(N_FRAMES, 32, seed=6), question="q", id="b")])
        vt = batch.roles.visual_tokens()
        first = FirstImage(n=1)
        first.offer(ov, batch, vt)
        assert [(e["sample_id"], e["frame"]) for e in first.images] == [("a", f) for f in range(N_FRAMES)]
        for e in first.images:
            mine = (vt["sample"] == 0) & (vt["frame"] == e["frame"])
            assert list(zip(e["row"], e["col"])) == list(zip(vt["row"][mine].tolist(), vt["col"][mine].tolist()))
            want = np.asarray(frames[e["frame"]], dtype=np.float32) / 255
            assert np.abs(e["pixels"].numpy() - want).max() < 1e-5, e["frame"]
    finally:
        ov.processor.video_config = None


def test_tower_ranked_reduction_refuses_a_pooled_video_batch():
    """FasterVLM ranks one tower patch per visual token; a OneVision video token pools four, so a video batch is
    refused (an image batch of the same model runs)."""
    from embedlens.errors import InterventionError
    from embedlens.reduction.attention_ranked import FasterVLM

    ov = load_model("tiny:llava_onevision")
    engine = Engine(ov)
    engine.run(ov.encode([Sample([shapes(32)], question="q", id="i")]), [FasterVLM(keep=0.5)])
    with pytest.raises(InterventionError, match="pools several of the tower's patches"):
        engine.run(ov.encode([Sample(video=_frames(2, 32), question="q", id="v")]), [FasterVLM(keep=0.5)])


def test_a_flag_on_one_patch_reaches_the_tokens_that_pool_it(ov):
    """`vision_to_tokens` (the ViT-norm rule's per-patch flags read per token) on a video batch: a flag planted on one
    patch of one frame reaches exactly the tokens whose pooled 2 x 2 support (`patch_indices`) holds it, not the
    token whose pooled index happens to equal the patch's."""
    from embedlens.signals import vision_to_tokens

    batch = _batch(ov, n=1)
    vt = batch.roles.visual_tokens()
    n = ov.side // ov.config.vision_config.patch_size
    rows = int(batch.inputs["pixel_values_videos"].shape[1])
    for f, pr, pc in ((0, 0, 0), (rows - 1, n - 1, n - 1), (1 % rows, n // 2, 1)):
        flags = torch.zeros(rows, n * n)
        flags[f, pr * n + pc] = 1.0
        got = vision_to_tokens(flags, vt, ov, batch.inputs).bool()
        want = (vt["feature_row"] == f) & (ov.patch_indices(vt["feature_col"], batch.inputs) == pr * n + pc).any(1)
        assert torch.equal(got, want) and bool(want.any())
