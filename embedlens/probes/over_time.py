"""A video's tokens over time: per place of the frame grid (sample, image, row, col), how its tokens behave
across frames (temporal patches).

- `group_persistence`: in how many of a place's frames its token is in a group (does a dead token stay dead?);
- `top1_agreement`: the share of a place's frames whose top-1 vocabulary id is the place's most frequent one
  (1 where every frame reads the same word: static content on a model that sees it the same way);
- `sink_persistence`: SToP's temporal sink score, the attention a place draws averaged over its frames;
- `place_content`: what a place shows over the kept frames of a synthetic video (static background, static
  object, moving), from its truth, to split the others by.

The first three run on the device in a few scatters over the batch's video tokens (image tokens, ``frame == -1``, are
left out) and return whole tensors, one row per place, in the order of `places`.
"""

from __future__ import annotations



def places(vt: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(video, inverse, keys)``: the mask of video tokens in `vt`, each one's place index, and ``[places, 4]``
    (sample, image, row, col) of every place."""
    import torch

    video = vt["frame"] >= 0
    cols = torch.stack([vt[c][video] for c in ("sample", "image", "row", "col")], dim=1)  # [tokens, 4]
    keys, inverse = torch.unique(cols, dim=0, return_inverse=True)
    return video, inverse, keys


def group_persistence(vt: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, n_frames, n_in)``: per place, its frames and those in which its token is in `mask` (one bool per
    token of `vt`)."""
    import torch

    video, inverse, keys = places(vt)
    n = len(keys)
    n_frames = torch.bincount(inverse, minlength=n)
    n_in = torch.bincount(inverse, weights=mask[video].to(torch.float64), minlength=n).round().long()
    return keys, n_frames, n_in


def top1_agreement(vt: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, n_frames, n_agree)``: per place, its frames and how many of them have its most frequent top-1 id
    (`ids`: one vocabulary id per token of `vt`)."""
    import torch

    video, inverse, keys = places(vt)
    n = len(keys)
    n_frames = torch.bincount(inverse, minlength=n)
    pairs = torch.stack([inverse, ids[video].to(inverse.device)], dim=1)
    uniq, counts = torch.unique(pairs, dim=0, return_counts=True)
    n_agree = torch.zeros(n, dtype=counts.dtype, device=counts.device).scatter_reduce(0, uniq[:, 0], counts, "amax")
    return keys, n_frames, n_agree


#: What a place of the frame grid shows over a video's kept frames, from its ground truth (`place_content`).
CONTENT = ("static_background", "static_object", "moving")


def content_grid(sample) -> torch.Tensor | None:
    """``[rows, cols]`` index into `CONTENT` of each truth patch of a synthetic video sample, over its kept frames,
    from its objects' boxes (``meta["objects"][i]["boxes"][source frame]``) on the truth grid
    (``meta["frame_patch_labels"]``): *moving* where the box of an object that moves touches the patch in some
    kept frame, *static object* where only still objects' boxes do, *static background* where none does. The
    pixels of a static place are the same in every kept frame (the background does not change and still shapes
    are drawn alike); a moving one's may change. None where the sample has no such truth (e.g. a real video).
    """
    import torch

    meta = sample.meta or {}
    labels, objects = meta.get("frame_patch_labels"), meta.get("objects")
    if not isinstance(labels, dict) or not isinstance(objects, list) or sample.video is None or not labels.get("kind"):
        return None
    try:
        rows, cols = len(labels["kind"][0]), len(labels["kind"][0][0])
        size = int(meta.get("size") or sample.video.frames[0].size[0])  # the frames' side as drawn
        kept = torch.tensor(list(sample.video.indices))
        boxes = torch.tensor([o["boxes"] for o in objects], dtype=torch.long)[:, kept]  # [objects, kept frames, 4]
        moves = torch.tensor([o["direction"] != "still" for o in objects])
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError):
        return None  # truth of other frames or of another shape: not this video's, no split
    # each patch's pixel span, as `embedlens.synthetic.patch_truth` cuts the frame: [start, end) per row / col
    re = torch.linspace(0, size, rows + 1).round().long()
    ce = torch.linspace(0, size, cols + 1).round().long()
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # [objects, frames, 1, 1], inclusive corners
    touch = ((x0 < ce[None, 1:]) & (x1 >= ce[None, :-1]) & (y0 < re[1:, None]) & (y1 >= re[:-1, None]))  # [objects, frames, rows, cols]
    touch = touch.any(1)  # [objects, rows, cols]: in some kept frame
    moving = (touch & moves[:, None, None]).any(0)
    still = (touch & ~moves[:, None, None]).any(0)
    return torch.where(moving, 2, torch.where(still, 1, 0))


def place_content(batch, keys: torch.Tensor) -> torch.Tensor:
    """``[places]`` index into `CONTENT` of each place (`places`' keys: sample, image, row, col), -1 where unknown:
    the sample has no per-frame truth, or its truth grid is not the video's token grid (a place's truth must be its
    token's own patch; `synthetic_video.patch_grid` = the frame's token grid)."""
    import torch

    k = keys.cpu()
    out = torch.full((len(k),), -1, dtype=torch.long)
    for b, s in enumerate(batch.samples):  # per sample (a few), never per token
        grid = content_grid(s)
        mine = (k[:, 0] == b) & (k[:, 1] == 0)
        if grid is None or not bool(mine.any()):
            continue
        rows, cols = k[mine, 2], k[mine, 3]
        if (int(rows.max()) + 1, int(cols.max()) + 1) != tuple(grid.shape):
            continue
        out[mine] = grid[rows, cols]
    return out.to(keys.device)


def sink_persistence(vt: dict[str, torch.Tensor], attention: torch.Tensor, gamma: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SToP's sink score of every place (Kim et al. 2026, "Sink-Token-Aware Pruning for Fine-Grained Video
    Understanding in Efficient Video LLMs", arXiv:2604.20937; reference code ``minmax_norm(attn.mean(0) ** gamma)``):
    the attention a place's token draws, averaged over the video's frames, raised to `gamma`, and min-max
    normalised over the places of its video (``(x - min) / (max - min + 1e-12)``). A token that draws attention
    in every frame scores high; one that draws as much in a single frame scores lower.

    Args:
        vt: `TokenRoles.visual_tokens` of the batch (image tokens, ``frame == -1``, are left out).
        attention: ``[tokens]`` the attention each token of `vt` draws in its own frame.
        gamma: SToP's exponent (1.1 in its code).

    Returns:
        ``(keys, n_frames, mean_attention, score, inverse)``: per place (sample, image, row, col), its frames, mean
        attention and score; `inverse` the place of each video token of `vt` (in `vt`'s order of video tokens).
    """
    import torch

    video, inverse, keys = places(vt)
    n = len(keys)
    n_frames = torch.bincount(inverse, minlength=n)
    mean = torch.bincount(inverse, weights=attention[video].to(inverse.device, torch.float64), minlength=n) / n_frames
    powered = mean**gamma
    _, vid = torch.unique(keys[:, :2], dim=0, return_inverse=True)  # each place's video
    lo = torch.full((n,), torch.inf, dtype=powered.dtype, device=powered.device).scatter_reduce(0, vid, powered, "amin")
    hi = torch.full((n,), -torch.inf, dtype=powered.dtype, device=powered.device).scatter_reduce(0, vid, powered, "amax")
    score = (powered - lo[vid]) / (hi[vid] - lo[vid] + 1e-12)
    return keys, n_frames, mean, score, inverse
