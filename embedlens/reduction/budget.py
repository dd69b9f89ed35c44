"""One token budget for every token-reduction method.

``keep: 64`` keeps 64 visual tokens of each image; ``keep: 0.11`` keeps
``ceil(0.11 * n)`` of an image's ``n`` candidate tokens (at least one, since
``0 < keep``). An integer budget at or above ``n`` keeps the whole image. The
budget is per image, so a sample with two images keeps up to twice as many
tokens, as the papers count LLaVA-1.5's 576 tokens per image.

``per`` says what one budget covers in a video: ``image`` (the default) takes it
from the whole video, as from one image (``keep: 64`` keeps 64 of the video's
tokens, ``keep: 0.25`` a quarter of them, wherever they are); ``frame`` takes it
from each frame (temporal patch) of the video alone (``keep: 4`` keeps 4 tokens
of every frame, ``keep: 0.25`` a quarter of each frame's). On image samples the
two are the same.

`Budget.keep_mask` turns per-token scores into the kept set, per image (or frame) and on
the device: highest scores first, ties broken by position (the earlier token
wins), so every method that ranks tokens shares one rule for ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from embedlens.errors import InterventionError
from embedlens.reduction._rank import frame_groups, group_sizes, image_groups, ranks

if TYPE_CHECKING:
    from embedlens.roles import TokenRoles

#: what one budget covers: each image (a video counting as one), or each frame of a video
BudgetPer = Literal["image", "frame"]
PER = ("image", "frame")


def check_per(value: object, key: str = "per") -> str:
    """A plan's ``per``: ``image`` or ``frame``.

    Raises:
        InterventionError: naming `key` and the value, with what was expected.
    """
    if value not in PER:
        raise InterventionError(f"{key}: expected 'image' (one budget per image, a video counting as one) or "
                                f"'frame' (one budget per frame of a video); got {value!r}")
    return str(value)


@dataclass(frozen=True)
class Budget:
    """How many visual tokens of each image (or each frame of a video: `per`) a method keeps: an int count, or a
    float fraction in (0, 1].

    Example:
        >>> Budget.parse(0.5, per="frame")
        Budget(keep=0.5, per='frame')
    """

    keep: int | float
    per: str = "image"

    @classmethod
    def parse(cls, value: object, key: str = "keep", per: object = "image") -> "Budget":
        """Check a plan value: a positive int (tokens per image) or a float in (0, 1] (a fraction of them), and
        what one budget covers (`per`: ``image`` or ``frame``).

        Raises:
            InterventionError: naming `key` (or ``per``) and the value, with what was expected.
        """
        per = check_per(per)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InterventionError(
                f"{key}: expected a token count (an integer >= 1) or a fraction in (0, 1]; got {value!r}"
            )
        if isinstance(value, int):
            if value < 1:
                raise InterventionError(f"{key}: a token count must be at least 1; got {value}")
            return cls(int(value), per)
        if not (0.0 < value <= 1.0):
            raise InterventionError(f"{key}: a fraction must be in (0, 1]; got {value!r}")
        return cls(float(value), per)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.keep, float)

    def groups(self, roles: "TokenRoles") -> torch.Tensor:
        """`[batch, seq]` long: each token's budget group within its sample, -1 off images: its image
        (``per: image``), or its image and frame (``per: frame``: `frame_groups`, one group per frame of a video,
        one per image); what `keep_mask` and the methods' selection functions take as `image`."""
        return roles.image if self.per == "image" else frame_groups(roles.image, roles.frame)

    def counts(self, n: torch.Tensor) -> torch.Tensor:
        """Tokens kept of `n` candidates (any shape, long), elementwise; 0 where `n` is 0."""
        import torch

        n = n.long()
        if self.is_fraction:
            k = (n.double() * self.keep).ceil().long()  # in float64, as FastV's `math.ceil(n * keep)`
        else:
            k = torch.full_like(n, int(self.keep))
        return torch.minimum(k, n)

    def keep_mask(self, scores: torch.Tensor, candidates: torch.Tensor, image: torch.Tensor,
                  counts: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
        """The kept tokens: per (sample, group), the `counts` highest-scoring candidates.

        Args:
            scores: `[batch, seq]` float; higher is kept first (finite; a method maps its own missing values to -inf).
            candidates: `[batch, seq]` bool: the tokens the budget is taken from.
            image: `[batch, seq]` long: each token's budget group within its sample, -1 off images (`groups`: its
                image, `TokenRoles.image`, or its image and frame).
            counts: how many of an image's `n` candidates to keep (`[batch, groups]` long -> same), for a method
                whose schedule keeps another number at some stage (PyramidDrop, FastV matched to an average);
                `Budget.counts` by default.

        Returns:
            `[batch, seq]` bool, a subset of `candidates`; everything stays on the device (no host reads).
        """
        import torch

        group = image_groups(candidates, image)
        n = group_sizes(group)
        k = torch.minimum((counts or self.counts)(n), n)
        k[:, -1] = 0  # the bucket of non-candidates
        rank = ranks([-scores.double()], candidates, image)  # highest first, then by position
        return (rank < k.gather(1, group)) & candidates
