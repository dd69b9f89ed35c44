"""The token-role map: what every position of every sample in a batch is.

Probes and interventions select tokens by role (``roles.visual``,
``roles.question``, ``roles.last``) instead of doing position arithmetic, and
read for each visual token which image, tile and patch (row, col) it shows, and
for a video which frame (temporal index) it comes from.

Example:
    >>> import torch
    >>> from embedlens.roles import Role, TokenRoles
    >>> kind = torch.tensor([[Role.BOS, Role.VISUAL, Role.VISUAL, Role.QUESTION]])
    >>> minus = torch.full_like(kind, -1)
    >>> roles = TokenRoles(kind=kind, image=minus, tile=minus, row=minus, col=minus,
    ...                    feature_row=minus, feature_col=minus)
    >>> roles.visual.sum().item(), roles.last.nonzero().tolist()
    (2, [[0, 3]])
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum



class Role(IntEnum):
    """What one sequence position holds."""

    PAD = 0
    TEMPLATE = 1  # system prompt / chat-template text
    QUESTION = 2
    ANSWER = 3
    VISUAL = 4  # a projected image patch
    BOS = 5
    IMAGE_NEWLINE = 6  # a learned separator inside the image span (anyres families)
    SPECIAL = 7  # any other special token (EOS, ...)
    IMAGE_CLS = 8  # the vision tower's CLS token, projected like a patch ("full" feature selection on CLIP)


TEXT_ROLES = (Role.TEMPLATE, Role.QUESTION, Role.ANSWER)


@dataclass
class TokenRoles:
    """Per-position roles for a batch; every tensor is ``[batch, seq]`` and long.

    Attributes:
        kind: a `Role` per position.
        image: index of the image within its sample (every token of the image span), else -1.
        tile: tile of that image (0 = the base/overview image; anyres tiles 1..), else -1.
        row, col: patch coordinates in the vision encoder's grid of that tile, else -1.
        feature_row: row of the vision-tower batch (one per tile) this token comes from, else -1.
        feature_col: index into that row's `vision.features` sequence, else -1.
        frame: for a video's visual tokens, the temporal index of the token within its video (the frame, or
            the temporal patch for families that merge frames in time: see the adapter for which frames it
            covers), else -1 (every image token and every non-visual token). Defaults to all -1.
    """

    kind: torch.Tensor
    image: torch.Tensor
    tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    feature_row: torch.Tensor
    feature_col: torch.Tensor
    frame: torch.Tensor | None = None

    def __post_init__(self) -> None:
        import torch

        if self.frame is None:
            self.frame = torch.full_like(self.kind, -1)
        elif self.frame.shape != self.kind.shape:
            raise ValueError(f"TokenRoles.frame is {tuple(self.frame.shape)}; expected {tuple(self.kind.shape)} like kind")

    # -- masks ---------------------------------------------------------------
    def _is(self, *roles: Role) -> torch.Tensor:
        # comparisons with Python ints stay on the device; a tensor of role ids built from a list would cost a
        # host-to-device copy (and, on a GPU, a wait) at every call
        out = self.kind == int(roles[0])
        for r in roles[1:]:
            out = out | (self.kind == int(r))
        return out

    @property
    def visual(self) -> torch.Tensor:
        """`[batch, seq]` bool: projected image patches."""
        return self._is(Role.VISUAL)

    @property
    def image_span(self) -> torch.Tensor:
        """`[batch, seq]` bool: everything the model fills with image features (patches, newlines, a kept CLS)."""
        return self._is(Role.VISUAL, Role.IMAGE_NEWLINE, Role.IMAGE_CLS)

    @property
    def text(self) -> torch.Tensor:
        """`[batch, seq]` bool: template, question and answer text."""
        return self._is(*TEXT_ROLES)

    @property
    def template(self) -> torch.Tensor:
        return self._is(Role.TEMPLATE)

    @property
    def question(self) -> torch.Tensor:
        return self._is(Role.QUESTION)

    @property
    def answer(self) -> torch.Tensor:
        return self._is(Role.ANSWER)

    @property
    def bos(self) -> torch.Tensor:
        return self._is(Role.BOS)

    @property
    def image_newline(self) -> torch.Tensor:
        return self._is(Role.IMAGE_NEWLINE)

    @property
    def image_cls(self) -> torch.Tensor:
        """`[batch, seq]` bool: the tower's CLS token where the model keeps it (no patch, row = col = -1)."""
        return self._is(Role.IMAGE_CLS)

    @property
    def special(self) -> torch.Tensor:
        """`[batch, seq]` bool: BOS, image newlines, a kept CLS and other special tokens."""
        return self._is(Role.BOS, Role.IMAGE_NEWLINE, Role.IMAGE_CLS, Role.SPECIAL)

    @property
    def padding(self) -> torch.Tensor:
        return self._is(Role.PAD)

    @property
    def last_index(self) -> torch.Tensor:
        """`[batch]` position of the last prompt token (the one that predicts the answer).

        With an answer, it is the token just before the answer starts;
        without, the last non-padding token.
        """
        import torch

        seq = self.kind.shape[1]
        pos = torch.arange(seq, device=self.kind.device).expand_as(self.kind)
        first_answer = torch.where(self.answer, pos, seq).min(dim=1).values
        prompt = ~self.padding & (pos < first_answer[:, None])
        return torch.where(prompt, pos, -1).max(dim=1).values

    @property
    def last(self) -> torch.Tensor:
        """`[batch, seq]` bool, one position per sample: the last prompt token."""
        import torch

        mask = torch.zeros_like(self.kind, dtype=torch.bool)
        mask[torch.arange(self.kind.shape[0]), self.last_index] = True
        return mask

    # -- tables ----------------------------------------------------------------
    def visual_tokens(self) -> dict[str, torch.Tensor]:
        """One entry per visual token of the batch, in (sample, position) order.

        Returns:
            dict of 1-D long tensors: ``sample``, ``position``, ``image``,
            ``tile``, ``row``, ``col``, ``feature_row``, ``feature_col``, ``frame``.
        """
        sample, position = self.visual.nonzero(as_tuple=True)
        out = {"sample": sample, "position": position}
        for name in ("image", "tile", "row", "col", "feature_row", "feature_col", "frame"):
            out[name] = getattr(self, name)[sample, position]
        return out

    def per_frame(self, mask: torch.Tensor, n_frames: int | None = None) -> torch.Tensor:
        """`[batch, frames]` long: how many positions of `mask` (`[batch, seq]` bool, e.g. a partition group)
        each frame of each sample's video holds; positions off video (frame -1) are not counted.

        Computed on the device in one scatter; `n_frames` (default: the batch's largest frame + 1, which reads
        one number from the device) fixes the width, e.g. to stack batches.

        >>> import torch
        >>> kind = torch.full((1, 4), int(Role.VISUAL))
        >>> minus = torch.full_like(kind, -1)
        >>> roles = TokenRoles(kind, minus, minus, minus, minus, minus, minus, frame=torch.tensor([[0, 0, 1, 1]]))
        >>> roles.per_frame(torch.tensor([[True, False, True, True]])).tolist()
        [[1, 2]]
        """
        import torch

        frame = self.frame
        n = int(frame.max()) + 1 if n_frames is None else n_frames
        out = torch.zeros(frame.shape[0], max(n, 0), dtype=torch.long, device=frame.device)
        if n > 0:
            out.scatter_add_(1, frame.clamp(min=0, max=n - 1), (mask & (frame >= 0) & (frame < n)).long())
        return out

    def grid_shape(self, sample: int, image: int, tile: int = 0) -> tuple[int, int]:
        """(rows, cols) of the patch grid of one tile of one image, as seen in this batch."""
        sel = self.visual[sample] & (self.image[sample] == image) & (self.tile[sample] == tile)
        if not sel.any():
            raise IndexError(f"sample {sample} has no visual tokens for image {image}, tile {tile}")
        return int(self.row[sample][sel].max()) + 1, int(self.col[sample][sel].max()) + 1

    def n_images(self, sample: int) -> int:
        return int(self.image[sample].max()) + 1

    def to(self, device) -> "TokenRoles":
        return TokenRoles(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
