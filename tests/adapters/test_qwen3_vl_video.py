"""Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 video: the prompt (a timestamp before each temporal patch) and pixels against
HF's own processor code and HF's video patchify written out, positions against Qwen3-VL's M-RoPE rule written out,
each visual token on its true temporal patch and patch (one frame's patch perturbed), the feature rows and DeepStack
rows HF scatters, sites and engine logits equal to HF's forward, and pruning a temporal patch equal to HF on the
shortened sequence; on embedlens's tiny models and HF's Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 tester configurations."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from embedlens.adapters import load_model, wrap_model
from embedlens.adapters.capabilities import Capability
from embedlens.adapters.qwen2_vl_video import QwenVideo, frame_timestamps
from embedlens.data import Sample
from embedlens.errors import InputError
from embedlens.interventions import Engine
from embedlens.roles import Role
from embedlens.sites import Site
from embedlens.tracing import collect
from embedlens.video import Video
from tests.support.hf_testers import BLOCK_TESTER_CONFIGS

TOL = dict(atol=1e-4, rtol=1e-4)
MODELS = ("tiny:qwen3_vl", "tester:qwen3_vl", "tiny:qwen3_vl_moe", "tester:qwen3_vl_moe", "tiny:qwen3_5", "tester:qwen3_5")


def _frames(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=MODELS)
def qwen(request):
    kind, family = request.param.split(":")
    adapter = load_model(f"tiny:{family}") if kind == "tiny" else wrap_model(*BLOCK_TESTER_CONFIGS[family].build(0))
    assert adapter.name == family and adapter.has(Capability.VIDEO)
    ip = adapter.processor.image_processor
    # frames the image processor keeps as they are (sides a multiple of patch x merge within its bounds); the tester
    # keeps up to 48 px: 3 x 3 patches of 16 px, no merge
    factor = int(ip.patch_size) * int(ip.merge_size)
    adapter.side = min(4 * int(ip.patch_size), int(int(ip.size["longest_edge"]) ** 0.5) // factor * factor)
    return adapter


def _videos(qwen, n_frames=(4, 3)) -> list[Video]:
    # the first as a decoded file would give it (source indices at a known rate), the rest as lists of frames
    out = []
    for i, n in enumerate(n_frames):
        frames = _frames(n, qwen.side, seed=i)
        out.append(Video(frames, [7 * k + 3 for k in range(n)], 25.0 / 7, "clip.mp4", 25.0) if i == 0 else Video(frames))
    return out


def _batch(qwen, n_frames=(4, 3), padding_side="left"):
    samples = [Sample(video=v, question=q, id=f"v{i}")
               for i, (v, q) in enumerate(zip(_videos(qwen, n_frames), ["count the shapes", "what?", "is it red?"]))]
    return qwen.encode(samples, padding_side=padding_side)


def test_prompt_and_pixels_equal_hfs_processing(qwen):
    """The text HF's own `Qwen3VLProcessor` writes (its `replace_video_token`, `_calculate_timestamps` and wrapper
    collapse, fed the video's metadata as HF's loader gives it), tokenised, is the batch's ids; the patch rows are
    HF's Qwen3-VL video patchify written out on the normalised frames."""
    ip = qwen.processor.image_processor
    p, m, s = int(ip.patch_size), qwen.merge_size, qwen.side
    for video in _videos(qwen, (3, 4)):
        batch = qwen.encode([Sample(video=video, question="what moves?", id="v")])
        # pixels: pad to an even count with the last frame, view (t, 2, C, h/m, m, p, w/m, m, p), permute as HF
        mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
        x = torch.stack([(torch.tensor(np.asarray(f), dtype=torch.float32).permute(2, 0, 1) / 255 - mean) / std
                         for f in video.frames])
        x = torch.cat([x, x[-1:].expand(len(x) % 2, -1, -1, -1)])
        t, g = len(x) // 2, s // p
        want = x.view(t, 2, 3, g // m, m, p, g // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * g * g, -1)
        torch.testing.assert_close(batch.inputs["pixel_values_videos"], want, atol=1e-5, rtol=0)
        assert batch.inputs["video_grid_thw"].tolist() == [[t, g, g]]
        # the prompt: HF's processor on the template's text (its <|vision_start|><|video_pad|><|vision_end|>)
        template = QwenVideo.prompt(qwen, Sample(video=video, question="what moves?", id="v")).text
        text = _hf_text(qwen, template, video, batch.inputs)
        assert "seconds>" in text and text.count(qwen.processor.vision_start_token) == t
        assert batch.input_ids[0].tolist() == qwen.tokenizer(text)["input_ids"]
        assert torch.equal(batch.inputs["mm_token_type_ids"], (batch.input_ids == qwen.config.video_token_id).long() * 2)
    # the patch times by hand: source frames 3, 10, 17 (17 repeated) at 25 fps; a list of frames at HF's 24 fps
    assert frame_timestamps(_videos(qwen, (3,))[0], 2) == pytest.approx([(3 + 10) / 2 / 25, 17 / 25])
    assert frame_timestamps(Video(_frames(4, 8)), 2) == pytest.approx([0.5 / 24, 2.5 / 24])


def _hf_text(qwen, template: str, video: Video, inputs) -> str:
    """HF's `Qwen3VLProcessor` text for one video: its `replace_video_token` (timestamps from the video's metadata
    as HF's loader gives it) and `get_text_with_replacements` (the template's wrapper collapsed), run on the
    adapter's processor with a stand-in for the torchvision video processor (which only lends two sizes here)."""
    ip = qwen.processor.image_processor
    meta = VideoMetadata(total_num_frames=max(video.indices) + 1, fps=video.source_fps, frames_indices=list(video.indices))
    proc = qwen.processor
    proc.video_processor = SimpleNamespace(merge_size=int(ip.merge_size), temporal_patch_size=int(ip.temporal_patch_size))
    try:
        rep = Qwen3VLProcessor.replace_video_token(proc, {**inputs, "video_metadata": [meta]}, 0)
        (text,), _ = Qwen3VLProcessor.get_text_with_replacements(proc, [template], [], [rep])
    finally:
        proc.video_processor = None
    return text


def test_a_full_prompt_places_the_video_where_it_says(qwen):
    """A sample's own `prompt` with a bare video placeholder (no wrapper to collapse) is expanded as HF expands it."""
    video = _videos(qwen, (4,))[0]
    prompt = "look: <|video_pad|> what moves?"
    batch = qwen.encode([Sample(video=video, prompt=prompt, id="v")])
    assert batch.input_ids[0].tolist() == qwen.tokenizer(_hf_text(qwen, prompt, video, batch.inputs))["input_ids"]
    assert int(batch.roles.visual.sum()) == int(batch.inputs["video_grid_thw"][0].prod()) // qwen.merge_size**2


def test_role_map_and_positions(qwen):
    """Each visual token on its temporal patch, row and col; timestamps are text (template, frame -1) and each patch
    has its own vision start/end (special); positions as Qwen3-VL's rule written out: text counts on, a temporal
    patch's tokens get (start, start + row, start + col) and the text after it resumes at start + max(h, w)."""
    batch = _batch(qwen)
    roles, ids = batch.roles, batch.input_ids
    assert torch.equal(roles.visual, batch.inputs["mm_token_type_ids"] == 2)
    assert (ids[roles.visual] == qwen.config.video_token_id).all()
    g = qwen.side // int(qwen.processor.image_processor.patch_size) // qwen.merge_size
    pos = qwen.position_ids(batch.inputs)
    vs, ve = qwen.config.vision_start_token_id, qwen.config.vision_end_token_id
    for b, n_frames in enumerate((4, 3)):
        vis, t = roles.visual[b], (n_frames + 1) // 2
        k = torch.arange(t * g * g)
        assert torch.equal(roles.frame[b][vis], k // (g * g))
        assert torch.equal(roles.row[b][vis], (k % (g * g)) // g) and torch.equal(roles.col[b][vis], k % g)
        assert (roles.frame[b][~vis] == -1).all()
        assert int((ids[b] == vs).sum()) == t == int((ids[b] == ve).sum())
        assert (roles.kind[b][(ids[b] == vs) | (ids[b] == ve)] == Role.SPECIAL).all()
        # the text between the patches (the timestamps) is template text
        valid = batch.inputs["attention_mask"][b].bool()
        first, last = int(vis.nonzero()[0]), int(vis.nonzero()[-1])
        between = valid & ~vis & (torch.arange(len(vis)) > first) & (torch.arange(len(vis)) < last)
        kinds = set(roles.kind[b][between].tolist())
        assert kinds == {int(Role.TEMPLATE), int(Role.SPECIAL)}, kinds
        # positions, walked token by token
        want, cur, j = [], 0, 0
        seq = ids[b][valid]
        vis_b = vis[valid]
        while j < len(seq):
            if vis_b[j]:
                for r in range(g):
                    for c in range(g):
                        want.append((cur, cur + r, cur + c))
                j, cur = j + g * g, cur + g
            else:
                want.append((cur, cur, cur))
                j, cur = j + 1, cur + 1
        assert pos[:, b][:, valid].T.tolist() == [list(w) for w in want]
    tok = qwen.tokenizer
    assert tok.decode(ids[0][roles.question[0]]).replace(" ", "") == "counttheshapes"


def test_one_frames_patch_reaches_exactly_its_token(qwen):
    """Invert one patch of one frame: exactly one row of the tower's patch embedding (`vision.embed`) changes,
    and it is in the block of the token the role map puts at (frame // 2, row // merge, col // merge)."""
    p = int(qwen.processor.image_processor.patch_size)
    frames = _frames(4, qwen.side, seed=3)
    enc = lambda fr: qwen.encode([Sample(video=fr, question="what moves?", id="v")])  # noqa: E731
    ref = enc(frames)
    base = collect(qwen, ref, ["vision.embed"])[Site("vision.embed")][0]
    vt = ref.roles.visual_tokens()
    n = qwen.side // p
    for f, pr, pc in ((0, 0, 0), (1, 2 % n, 1), (2, n - 1, 1), (3, 1, n - 1)):
        arr = np.asarray(frames[f]).copy()
        arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p] = 255 - arr[pr * p:(pr + 1) * p, pc * p:(pc + 1) * p]
        got = collect(qwen, enc(frames[:f] + [Image.fromarray(arr)] + frames[f + 1:]), ["vision.embed"])[Site("vision.embed")][0]
        rows = (got - base).abs().amax(-1).gt(1e-6).nonzero().flatten()
        assert len(rows) == 1, (f, pr, pc, rows)
        token = (vt["frame"] == f // 2) & (vt["row"] == pr // qwen.merge_size) & (vt["col"] == pc // qwen.merge_size)
        assert int(token.sum()) == 1
        assert int(rows[0]) in qwen.patch_indices(vt["feature_col"][token])[0].tolist(), (f, pr, pc)
        assert not (qwen.patch_indices(vt["feature_col"][~token]) == rows[0]).any()


def test_feature_rows_are_the_rows_hf_scatters(qwen):
    """Each video token's `llm.embed` row is row `feature_col` of HF's `get_video_features`, and (DeepStack) its
    row of every DeepStack level, as the engine adds them."""
    batch = _batch(qwen)
    inner = qwen.model.model
    with torch.no_grad():
        hf = inner.get_video_features(batch.inputs["pixel_values_videos"], batch.inputs["video_grid_thw"], return_dict=True)
    vt = batch.roles.visual_tokens()
    emb = collect(qwen, batch, ["llm.embed"])[Site("llm.embed")]
    torch.testing.assert_close(emb[vt["sample"], vt["position"]], torch.cat(hf.pooler_output)[vt["feature_col"]], atol=0, rtol=0)
    if qwen.has(Capability.DEEPSTACK):
        deep = Engine(qwen).deepstack(batch)
        assert len(deep) == len(hf.deepstack_features) == len(qwen.config.vision_config.deepstack_visual_indexes)
        for ours, theirs in zip(deep, hf.deepstack_features):
            theirs = torch.cat(theirs) if isinstance(theirs, (list, tuple)) else theirs
            torch.testing.assert_close(ours[vt["sample"], vt["position"]], theirs[vt["feature_col"]], atol=0, rtol=0)
            assert (ours[~batch.roles.visual] == 0).all()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sites_and_engine_logits_equal_hf(qwen, padding_side):
    batch = _batch(qwen, padding_side=padding_side)
    n = qwen.n_llm_layers
    acts = collect(qwen, batch, [f"llm.layers[{i}]" for i in range(n)] + ["llm.unembed"])
    with torch.no_grad():
        out = qwen.model(**qwen.model_inputs(batch), output_hidden_states=True)
    valid = batch.inputs["attention_mask"].bool()
    for i in range(n - 1):  # the last layer's output is normed in HF's hidden_states
        torch.testing.assert_close(acts[Site("llm.layers", i)][valid], out.hidden_states[i + 1][valid], **TOL)
    torch.testing.assert_close(acts[Site("llm.unembed")][valid], out.logits[valid], **TOL)
    torch.testing.assert_close(Engine(qwen).run(batch).logits()[valid], out.logits[valid], **TOL)
    with torch.no_grad():
        tower = qwen.model.model.visual(batch.inputs["pixel_values_videos"], grid_thw=batch.inputs["video_grid_thw"],
                                        output_hidden_states=True)
    layers = collect(qwen, batch, [f"vision.layers[{i}]" for i in range(qwen.n_vision_layers)])
    for i in range(qwen.n_vision_layers):
        h = tower.hidden_states[i + 1]
        torch.testing.assert_close(layers[Site("vision.layers", i)], h if h.dim() == 3 else h[None], **TOL)


def test_pruning_one_temporal_patch_equals_hf_on_the_shortened_sequence(qwen):
    """Pruning `visual and frame == 1` gives the logits of HF's language model run on the sequence with those
    tokens cut out: HF's own embeddings, video features and positions (`get_rope_index` on the full sequence,
    kept as they were), and the kept tokens' DeepStack rows."""
    from embedlens.interventions.prune import Prune

    batch = _batch(qwen, n_frames=(4,))
    pruned = Engine(qwen).run(batch, [Prune(tokens="visual and frame == 1")])
    inner, inputs = qwen.model.model, batch.inputs
    ids, visual = batch.input_ids, inputs["mm_token_type_ids"] == 2
    with torch.no_grad():
        hf = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
        embeds = inner.get_input_embeddings()(ids)
        embeds[visual] = torch.cat(hf.pooler_output)
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
                                      attention_mask=inputs["attention_mask"])
        per_patch = int(inputs["video_grid_thw"][0, 1:].prod()) // qwen.merge_size**2
        patch = torch.zeros_like(ids)
        patch[visual] = torch.arange(int(visual.sum())) // per_patch
        cut = visual & (patch == 1)
        keep = ~cut[0]
        extra = {}
        if qwen.has(Capability.DEEPSTACK):
            kept_rows = ~cut[visual]
            extra = dict(visual_pos_masks=visual[:, keep],
                         deepstack_visual_embeds=[torch.cat(d)[kept_rows] if isinstance(d, (list, tuple)) else d[kept_rows]
                                                  for d in hf.deepstack_features])
        out = inner.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, :, keep], **extra)
        logits = qwen.model.lm_head(out.last_hidden_state)
    assert int(cut.sum()) == per_patch
    torch.testing.assert_close(pruned.last_logits(), logits[:, -1], **TOL)


def test_engine_generation_equals_hf(qwen):
    batch = _batch(qwen, padding_side="left")
    ours = Engine(qwen).run(batch, cache=True).generate(3)
    with torch.no_grad():
        hf = qwen.model.generate(**qwen.model_inputs(batch), max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("cap", [False, True])
def test_a_checkpoints_video_processor_sizes_the_frames(tmp_path, cap):
    """With a checkpoint's video processor settings (read by HF's `Qwen3VLVideoProcessor`, no torchvision), a clip is
    sized as HF's video processor sizes it: its patch count is HF's own `get_num_of_video_patches`, bounding the
    whole clip (8 frames of 64 px: 40 px here, 24 with the per-frame cap, where the image processor alone gives 32);
    without them, per frame."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from embedlens.adapters.qwen2_vl import Qwen3VLAdapter

    tiny = load_model("tiny:qwen3_vl")
    tiny.processor.save_pretrained(tmp_path)
    video = Video(_frames(8, 64, seed=5))
    alone = Qwen3VLAdapter.load_processor(str(tmp_path))
    assert alone.video_sizing is None
    tiny.processor = alone
    assert tiny.encode([Sample(video=video, question="q", id="v")]).inputs["video_grid_thw"].tolist() == [[4, 8, 8]]
    settings = {"size": {"shortest_edge": 256, "longest_edge": 16384}, "patch_size": 4, "temporal_patch_size": 2,
                "merge_size": 2, "cap_pixels_per_frame": cap, "max_video_tokens": 9,
                "video_processor_type": "Qwen3VLVideoProcessor"}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(settings))
    tiny.processor = Qwen3VLAdapter.load_processor(str(tmp_path))
    assert isinstance(tiny.processor.video_sizing, Qwen3VLVideoProcessor)
    batch = tiny.encode([Sample(video=video, question="q", id="v")])
    t, gh, gw = batch.inputs["video_grid_thw"][0].tolist()
    hf = Qwen3VLVideoProcessor(**settings)
    assert t * gh * gw == hf.get_num_of_video_patches(8, 64, 64) and gh == gw
    assert gh * 4 == (24 if cap else 40)
    # the rows: each frame resized (bicubic) to that size, then normalised and patchified as HF does
    ip = tiny.processor.image_processor
    side = gh * 4
    x = torch.stack([torch.tensor(np.asarray(f.resize((side, side), Image.BICUBIC)), dtype=torch.float32).permute(2, 0, 1)
                     for f in video.frames]) / 255
    x = (x - torch.tensor(ip.image_mean)[:, None, None]) / torch.tensor(ip.image_std)[:, None, None]
    g, p, m = gh, 4, 2
    want = x.view(t, 2, 3, g // m, m, p, g // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * g * g, -1)
    torch.testing.assert_close(batch.inputs["pixel_values_videos"], want, atol=1e-5, rtol=0)
    assert int(batch.roles.visual.sum()) == t * g * g // m**2
    with torch.no_grad():
        ref = tiny.model(**tiny.model_inputs(batch)).logits
    torch.testing.assert_close(Engine(tiny).run(batch).logits(), ref, **TOL)
    if not cap:  # settings that do not fit the tower are refused, naming both
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({**settings, "patch_size": 8}))
        tiny.processor = Qwen3VLAdapter.load_processor(str(tmp_path))
        with pytest.raises(InputError, match=r"video processor's patch_size x merge_size \(8 x 2\) differs .* \(4 x 2\)"):
            tiny.encode([Sample(video=video, question="q", id="v")])
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({**settings, "size": {"longest_edge": 4096}}))
        tiny.processor = Qwen3VLAdapter.load_processor(str(tmp_path))
        with pytest.raises(InputError, match=r"size needs shortest_edge and longest_edge"):
            tiny.encode([Sample(video=video, question="q", id="v")])
