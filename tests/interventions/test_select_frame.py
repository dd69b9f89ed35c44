"""Selections by frame: ``frame`` is a token field like ``row`` and picks a video's tokens by temporal index."""

from __future__ import annotations

import pytest
import torch

from embedlens.errors import InterventionError
from embedlens.interventions.select import Selection
from embedlens.roles import Role, TokenRoles


def _video_roles() -> TokenRoles:
    """One sample: BOS, a 3-frame video of 2 x 2 tokens per frame, a question token; a second sample: an image."""
    n = 1 + 12 + 1
    kind = torch.full((2, n), int(Role.QUESTION))
    kind[:, 0] = int(Role.BOS)
    kind[0, 1:13] = int(Role.VISUAL)
    kind[1, 1:5] = int(Role.VISUAL)
    kind[1, 5:] = int(Role.PAD)
    minus = torch.full_like(kind, -1)
    frame, row, col = minus.clone(), minus.clone(), minus.clone()
    k = torch.arange(12)
    frame[0, 1:13], row[0, 1:13], col[0, 1:13] = k // 4, (k % 4) // 2, k % 2
    row[1, 1:5], col[1, 1:5] = torch.arange(4) // 2, torch.arange(4) % 2
    image = torch.where(kind == int(Role.VISUAL), 0, -1)
    return TokenRoles(kind=kind, image=image, tile=torch.where(image == 0, 0, -1), row=row, col=col,
                      feature_row=minus, feature_col=minus, frame=frame)


def test_frame_selects_exactly_that_frames_tokens():
    roles = _video_roles()
    mask = Selection.parse("visual and frame == 2").evaluate(roles)
    want = torch.zeros_like(mask)
    want[0, 9:13] = True  # tokens 8..11 of the video, positions 9..12
    assert torch.equal(mask, want)
    # combined with patch fields: frame 1's top-left token only
    one = Selection.parse("visual & frame == 1 & row == 0 & col == 0").evaluate(roles)
    assert one.nonzero().tolist() == [[0, 5]]
    # image tokens have frame -1: "frame >= 0" is the video's tokens, none of the image's
    assert torch.equal(Selection.parse("visual and frame >= 0").evaluate(roles)[1], torch.zeros(14, dtype=torch.bool))
    assert int(Selection.parse("frame in [0, 2]").evaluate(roles).sum()) == 8


def test_frame_defaults_to_minus_one_and_is_checked():
    roles = _video_roles()
    plain = TokenRoles(kind=roles.kind, image=roles.image, tile=roles.tile, row=roles.row, col=roles.col,
                       feature_row=roles.feature_row, feature_col=roles.feature_col)
    assert torch.equal(plain.frame, torch.full_like(roles.kind, -1))
    assert torch.equal(plain.to("cpu").frame, plain.frame)
    assert torch.equal(roles.visual_tokens()["frame"], torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [-1] * 4))
    with pytest.raises(ValueError, match="frame"):
        TokenRoles(kind=roles.kind, image=roles.image, tile=roles.tile, row=roles.row, col=roles.col,
                   feature_row=roles.feature_row, feature_col=roles.feature_col, frame=roles.frame[:, :3])


def test_misspelt_frame_field_is_suggested():
    with pytest.raises(InterventionError, match="Did you mean: frame"):
        Selection.parse("visual and frames == 1")
