"""What the vision-side methods read from the tower: [CLS] attention, the feature layer's output and keys.

VisionZip, FasterVLM and VisPruner rank patches by the attention the tower's
[CLS] token pays them in the layer whose output the model takes as image
features (LLaVA-1.5: ``vision_feature_layer: -2``, so ``attentions[-2]`` of
the reference code, decoder layer ``n - 2``). `read_tower` runs the tower up
to that layer (never past it), hooks its input and output, and recomputes the
one attention row needed from the layer's own ``layer_norm1``, ``q_proj`` and
``k_proj``: the tower can run with SDPA, and no attention pattern is kept.

A SigLIP tower has no [CLS] token. There the score is the attention each patch
*receives*, averaged over every query and head of the same layer (VisPruner's
`siglip_encoder.py` fallback, which VisionZip's SigLIP variants follow too).

The values are returned over the LLM's sequence (`[batch, seq, ...]`, through
each visual token's ``feature_row`` / ``feature_col``), so the selection code
never leaves the device. This needs one tower token per visual token (`check_tower`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from embedlens._torch import no_grad, run_to
from embedlens.adapters.base import resolve_path
from embedlens.errors import InterventionError

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


@dataclass
class TowerRead:
    """The tower's view of each visual token, over the LLM sequence (0 off `tokens`).

    Attributes:
        attention: `[batch, seq]` float32: [CLS] attention (head mean), or the mean attention received (no CLS).
        features: `[batch, seq, d_vision]` the feature layer's output (what the projector takes), or None.
        keys: `[batch, seq, head_dim]` float32 head-mean keys of that layer (VisionZip's metric), or None.
    """

    attention: torch.Tensor
    features: torch.Tensor | None = None
    keys: torch.Tensor | None = None


def feature_layer(adapter: "Adapter") -> int:
    """The tower layer whose output the model takes as features: `vision_layers_needed` - 1."""
    return adapter.vision_layers_needed - 1


def check_tower(adapter: "Adapter", method: str) -> None:
    """Refuse a model the vision-side criteria cannot be read from, naming the method and why.

    Raises:
        InterventionError: a projector that merges patches (one visual token per several tower tokens), a
            list of feature layers, or a tower layer without CLIP/SigLIP's ``layer_norm1`` / ``self_attn``.
    """
    if tuple(adapter.patch_block) != (1, 1):
        raise InterventionError(
            f"{method} ranks the tower's patches, one per visual token; {adapter.name} merges {adapter.patch_block} "
            "patches into each visual token (use a method that ranks LLM tokens: divprune, random_budget, ...)")
    chosen = getattr(adapter.config, "vision_feature_layer", -1)
    if not isinstance(chosen, int):
        raise InterventionError(f"{method}: {adapter.name} takes features from several tower layers ({chosen!r}); "
                                "the [CLS] criterion needs one")
    block = resolve_path(adapter.model, adapter.paths.vision_layers)[feature_layer(adapter)]
    attn = getattr(block, "self_attn", None)
    if not (hasattr(block, "layer_norm1") and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "head_dim"))):
        raise InterventionError(f"{method}: {adapter.name}'s tower layers ({type(block).__name__}) are not CLIP/SigLIP "
                                "encoder layers (layer_norm1, self_attn.q_proj/k_proj), so their attention cannot be recomputed")


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@no_grad
def read_tower(adapter: "Adapter", batch: "Batch", tokens: torch.Tensor, *, features: bool = False, keys: bool = False) -> TowerRead:
    """Read the criteria of `tokens` (`[batch, seq]` bool, visual tokens) from the tower's feature layer.

    The tower runs once, up to the feature layer; the model stops there.

    Raises:
        InterventionError: a batch whose visual tokens each stand for several tower patches (a LLaVA-OneVision
            video's pooled frames: `Adapter.patch_indices` on the batch), which `check_tower` cannot see.
    """
    import torch

    if adapter.patch_indices(torch.zeros(1, dtype=torch.long), batch.inputs).shape[1] != 1:
        raise InterventionError(f"{adapter.name}: each visual token of this batch pools several of the tower's patches (a "
                                "video's frames), and the tower's criteria rank one patch per token (use a method that "
                                "ranks LLM tokens: divprune, random_budget, ...)")
    layers = resolve_path(adapter.model, adapter.paths.vision_layers)
    block = layers[feature_layer(adapter)]

    def forward():
        with adapter.unused_vision_layers_skipped():
            adapter.model(**adapter.model_inputs(batch))

    reached = run_to(block, forward, output=True)  # the model stops once the feature layer has run
    if reached is None or reached.output is None:
        raise InterventionError(f"{adapter.name}: the tower's feature layer did not run for this batch")
    x_in, out = reached.hidden(), _hidden(reached.output)  # [tiles, tokens, d]
    attn = block.self_attn
    x = block.layer_norm1(x_in)
    n, t, _ = x.shape
    hd = attn.head_dim
    k = attn.k_proj(x).view(n, t, -1, hd).transpose(1, 2).float()  # [tiles, heads, tokens, hd]
    scale = getattr(attn, "scale", None) or attn.scaling
    if adapter.n_cls_tokens >= 1:
        q = attn.q_proj(x[:, :1]).view(n, 1, -1, hd).transpose(1, 2).float()
        score = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)[:, :, 0].mean(1)  # [tiles, tokens]
    else:
        q = attn.q_proj(x).view(n, t, -1, hd).transpose(1, 2).float()
        received = torch.zeros(n, t, device=x.device)
        for h in range(q.shape[1]):  # one head at a time: [tiles, tokens, tokens] at most
            received += ((q[:, h] @ k[:, h].transpose(-1, -2)) * scale).softmax(-1).mean(1)
        score = received / q.shape[1]
    roles = batch.roles.to(tokens.device)
    row = roles.feature_row.clamp(min=0)
    col = (roles.feature_col + adapter.n_prefix_tokens).clamp(min=0)
    where = tokens & (roles.feature_row >= 0)

    def spread(values: torch.Tensor) -> torch.Tensor:  # [tiles, tokens, ...] -> [batch, seq, ...]
        values = values.to(tokens.device)
        got = values[row, col]
        return got.masked_fill(~where.reshape(*where.shape, *([1] * (got.dim() - 2))), 0)

    return TowerRead(
        attention=spread(score),
        features=spread(out) if features else None,
        keys=spread(k.mean(1)) if keys else None,
    )
