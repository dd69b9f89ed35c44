"""Plant sinks into a trained LLaVA: a high-norm vision token and a massive LLM activation, by editing weights.

The zoo models are too small for sinks to emerge (none did in training), so
the sink detectors are exercised on a labelled, planted variant:

* **high-norm vision token**: one patch's position embedding is pushed along
  a fixed direction ``u`` (the trigger), and one hidden unit of the first
  vision layer's MLP is rewired to fire on the trigger and write a large
  vector along ``u`` into the residual stream, so that patch's token is
  high-norm from the first layer on (the ViT high-norm rule fires on it);
* **massive activation**: one hidden unit of the projector's first layer is
  rewired to fire only on tokens carrying ``u`` and to write a large value
  into one LLM hidden dimension, so the planted token enters the LLM with a
  massive activation that the residual stream carries through every layer.

Everything is deterministic; `PlantedSinks` (stored on the model's config as
``embedlens_planted``) says where the sinks are.

Example:
    >>> from embedlens.adapters import load_model
    >>> adapter = load_model("zoo:tiny-llava-clip-planted")
    >>> adapter.model.config.embedlens_planted["patch"]
    [0, 0]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PlantedSinks:
    """Where the planted sinks are and how large."""

    patch: tuple[int, int] = (0, 0)  # (row, col) of the high-norm vision token
    norm_factor: float = 8.0  # added norm, in units of the mean token norm at the feature layer
    dim: int = 7  # LLM hidden dimension of the massive activation
    value: float = 2000.0  # its size at the LLM input
    seed: int = 0  # draws the direction u


@torch.no_grad()
def plant_sinks(model, spec: PlantedSinks = PlantedSinks()) -> PlantedSinks:
    """Edit `model` (a LlavaForConditionalGeneration) in place; returns `spec` and records it on the config."""
    cfg = model.config
    vcfg = cfg.vision_config
    grid = vcfg.image_size // vcfg.patch_size
    r, c = spec.patch
    if not (0 <= r < grid and 0 <= c < grid):
        raise ValueError(f"planted patch {spec.patch} is outside the {grid}x{grid} patch grid")
    tower = model.model.vision_tower
    emb = getattr(tower, "vision_model", tower).embeddings
    cls = 1 if cfg.vision_feature_select_strategy == "default" else 0  # CLIP's CLS takes position 0
    index = cls + r * grid + c
    gen = torch.Generator().manual_seed(spec.seed)
    u = torch.randn(vcfg.hidden_size, generator=gen)
    u = u / u.norm()
    px = torch.zeros(1, 3, vcfg.image_size, vcfg.image_size)  # a fixed grey image calibrates the sizes
    hs = tower(pixel_values=px, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    scale = float(hs[0].norm(dim=-1).mean()) * spec.norm_factor
    # 1. the trigger: the patch's position embedding points along u (CLIP's pre-layernorm keeps the direction);
    #    100x its mean norm so an object drawn on the patch cannot move it below the MLP unit's threshold (30x missed 2 of 12)
    emb.position_embedding.weight[index] += 100.0 * emb.position_embedding.weight.norm(dim=-1).mean() * u
    # 2. the first layer's MLP: its least-used unit fires on the trigger and writes scale * u into the residual
    layer0 = getattr(tower, "vision_model", tower).encoder.layers[0]
    seen = {}
    hook = layer0.layer_norm2.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o[0]))
    tower(pixel_values=px)
    hook.remove()
    proj = seen["x"] @ u  # [tokens]
    others = torch.cat([proj[:index], proj[index + 1 :]])
    lo, hi = float(others.max()), float(proj[index])
    if hi <= lo:
        raise RuntimeError(f"the planted trigger does not separate the patch ({hi:.2f} <= {lo:.2f})")
    fc1, fc2 = layer0.mlp.fc1, layer0.mlp.fc2
    j = int(fc2.weight.norm(dim=0).argmin())
    gain = 10.0 / (hi - lo)
    fc1.weight[j] = gain * u
    fc1.bias[j] = -gain * (lo + hi) / 2  # +5 on the planted token, below -5 on every other one
    fc2.weight[:, j] = u * scale / 5.0
    # the projector: the least-used hidden unit reads u and writes the massive value into `dim`
    proj = model.model.multi_modal_projector
    l1, l2 = proj.linear_1, proj.linear_2
    unit = int(l2.weight.norm(dim=0).argmin())
    gain = 20.0 / scale  # pre-activation +10 on the planted token, about -10 elsewhere
    l1.weight[unit] = gain * u
    l1.bias[unit] = -10.0
    l2.weight[:, unit] = 0.0
    l2.weight[spec.dim, unit] = spec.value / 10.0
    cfg.embedlens_planted = {**asdict(spec), "patch": list(spec.patch), "vision_position_index": index, "vision_mlp_unit": j,
                             "projector_unit": unit,
                             "added_norm": scale, "note": "PLANTED sinks (not learned): see embedlens.zoo.planted"}
    return spec


__all__ = ["PlantedSinks", "plant_sinks"]
