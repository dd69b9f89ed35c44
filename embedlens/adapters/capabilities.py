"""What an adapter may declare beyond its required core: named capabilities, each with its group of methods.

The required core of an adapter is `architectures`, `model_class`, `paths` and `image_layouts` (`Adapter`
in `embedlens.adapters.base`). Everything else a family may differ in is one of the capabilities below:
one `Capability` member, declared in the adapter's ``capabilities`` set and read with
``adapter.has(Capability.X)``, plus the methods that go with it, grouped here as mixins of `Adapter`
whose defaults fit a family without it. A family that declares a capability overrides its methods.

==========================  =========================================  ============================================
capability                  methods (defaults below / in `Adapter`)     what declaring it says
==========================  =========================================  ============================================
``SINGLE_IMAGE``            `Adapter.encode`                            one image per prompt: `encode` refuses more
``ANSWER_SUFFIX``           `Adapter.prompt`, `Adapter.encode`          answers go to the processor as ``suffix``
``IMAGE_NEWLINE``           `Layout` (`image_layouts` rows of -1)       newline tokens inside the image span
``PRE_PROJECTOR_MERGE``     `Layout.patch_block`, `patch_indices`       tokens merge patch blocks before the
                                                                        projector: `vision.features` has one row
                                                                        per token
``PACKED_TOWER``            `PackedTower`                               the tower runs the batch's patches as one
                                                                        sequence without a batch dimension
``MROPE``                   `Positions.position_ids`                    `[3, batch, seq]` (t, h, w) position ids
``WINDOWED_BLOCKS``         `Positions.block_ids`                       a sliding window bounds the bidirectional
                                                                        blocks too (else only the causal part)
``SLIDING_BLOCKS_ONLY``     `Positions.block_ids`                       the bidirectional blocks apply on sliding
                                                                        layers only; global layers stay causal
                                                                        (Gemma 4)
``DEEPSTACK``               `embedlens.interventions.Engine.deepstack`  vision features added to the LLM's hidden
                                                                        states after its first layers
``VISION_FEATURE_LAYER``    `VisionFeatureLayer`                        image features are the tower's
                                                                        ``hidden_states[vision_feature_layer]``
``VIDEO``                   `Adapter.encode`, `Layout.image_layouts`    video samples are encoded: the family's
                            (`Layout.features_per_token`,               video inputs, each visual token's
                            `patch_indices` of the batch where video    ``frame`` in the role map (docs/video.md)
                            tokens pool patches image tokens do not)
==========================  =========================================  ============================================

Before these names, each was a boolean class attribute (`DEPRECATED_FLAGS`): a subclass that still sets
one gets it mapped onto ``capabilities``, and reading one still answers; both warn (`DeprecationWarning`).
"""

from __future__ import annotations

import operator
import warnings
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any

from embedlens.errors import AdapterError
from embedlens.sites import Site

if TYPE_CHECKING:  # annotations only (see embedlens.adapters: validate imports no transformers)
    from transformers import BatchFeature


class Capability(str, Enum):
    """One thing a family may do beyond the required core; its value is its name in docs and `embedlens list`."""

    SINGLE_IMAGE = "single_image"
    ANSWER_SUFFIX = "answer_suffix"
    IMAGE_NEWLINE = "image_newline"
    PRE_PROJECTOR_MERGE = "pre_projector_merge"
    PACKED_TOWER = "packed_tower"
    MROPE = "mrope"
    WINDOWED_BLOCKS = "windowed_blocks"
    SLIDING_BLOCKS_ONLY = "sliding_blocks_only"
    DEEPSTACK = "deepstack"
    VISION_FEATURE_LAYER = "vision_feature_layer"
    VIDEO = "video"

    def __str__(self) -> str:
        return self.value


#: The boolean class attributes the capabilities replace: old name -> (capability, whether True means declared).
#: ``multi_image`` is the one inverted flag (True unless the family takes one image: `SINGLE_IMAGE`).
DEPRECATED_FLAGS: dict[str, tuple[Capability, bool]] = {
    "multi_image": (Capability.SINGLE_IMAGE, False),
    "answer_as_suffix": (Capability.ANSWER_SUFFIX, True),
    "has_image_newline": (Capability.IMAGE_NEWLINE, True),
    "merge_before_projector": (Capability.PRE_PROJECTOR_MERGE, True),
    "packed_vision": (Capability.PACKED_TOWER, True),
    "mrope": (Capability.MROPE, True),
    "window_bounds_blocks": (Capability.WINDOWED_BLOCKS, True),
    "deepstack": (Capability.DEEPSTACK, True),
    "selects_vision_layer": (Capability.VISION_FEATURE_LAYER, True),
}

DEPRECATION_PREFIX = "Adapter flag"  # every warning below starts so (pytest turns them into errors for the repo's own code)


def _new_spelling(old: str) -> str:
    cap, positive = DEPRECATED_FLAGS[old]
    return f"{'' if positive else 'not '}adapter.has(Capability.{cap.name})"


class DeprecatedFlag:
    """A class-level attribute under an old flag name: reading it (on the class or an instance) warns and answers
    from ``capabilities``."""

    def __init__(self, old: str):
        self.old = old

    def __get__(self, obj: Any, owner: type) -> bool:
        cap, positive = DEPRECATED_FLAGS[self.old]
        warnings.warn(f"{DEPRECATION_PREFIX} {self.old!r} is deprecated; read {_new_spelling(self.old)} "
                      f"(embedlens.adapters.Capability)", DeprecationWarning, stacklevel=2)
        caps = owner.capabilities if obj is None else obj.capabilities
        return (cap in caps) == positive

    def __set__(self, obj: Any, value: Any) -> None:
        """Setting the old name on an instance (as before, e.g. ``adapter.mrope = True``) sets the capability on
        that instance, with a warning: without this, the value would shadow the flag and change nothing."""
        cap, positive = DEPRECATED_FLAGS[self.old]
        if not isinstance(value, (bool, int)):
            raise AdapterError(f"{type(obj).__name__}.{self.old} (deprecated) must be True or False; got {value!r}")
        warnings.warn(f"{DEPRECATION_PREFIX} {self.old!r} set on an instance is deprecated; declare Capability.{cap.name} in "
                      f"`capabilities` instead (read it with {_new_spelling(self.old)})", DeprecationWarning, stacklevel=2)
        caps = set(obj.capabilities)
        (caps.add if bool(value) == positive else caps.discard)(cap)
        obj.capabilities = frozenset(caps)


def parse_capabilities(where: str, values: Any) -> frozenset[Capability]:
    """``values`` (members or their names) as a frozenset of `Capability`; `where` names them in errors
    (``module.Class.capabilities``).

    Raises:
        AdapterError: not a collection, or a value that names no capability (with the names that exist).
    """
    if isinstance(values, (str, Capability)) or not hasattr(values, "__iter__"):
        raise AdapterError(f"{where} must be a set of embedlens.adapters.Capability; got {values!r}")
    out = set()
    for v in values:
        try:
            out.add(Capability(v))
        except ValueError:
            raise AdapterError(f"{where}: unknown capability {v!r}; expected one of "
                               f"{', '.join(c.value for c in Capability)}") from None
    return frozenset(out)


def declare(cls: type) -> None:
    """Normalise ``cls.capabilities`` and map old flag names a subclass sets onto it (with a warning naming both)."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    caps = set(parse_capabilities(f"{where}.capabilities", cls.capabilities))
    for old, (cap, positive) in DEPRECATED_FLAGS.items():
        if old not in cls.__dict__:
            continue
        value = cls.__dict__[old]
        if not isinstance(value, (bool, int)):
            raise AdapterError(f"{where}.{old} (deprecated) must be True or False; declare "
                               f"Capability.{cap.name} in `capabilities` instead; got {value!r}")
        warnings.warn(f"{DEPRECATION_PREFIX} {old!r} set by {where} is deprecated; declare Capability.{cap.name} in "
                      f"`capabilities` instead (read it with {_new_spelling(old)})", DeprecationWarning, stacklevel=3)
        (caps.add if bool(value) == positive else caps.discard)(cap)
        delattr(cls, old)  # the old name now reads through `DeprecatedFlag`, from `capabilities`
    cls.capabilities = frozenset(caps)


# -- the method groups ----------------------------------------------------------------------------------------
# Mixed into `Adapter`; they read the core's `config`, `model`, `paths`, `processor` and `n_prefix_tokens`.


class Layout:
    """Where visual tokens come from (with `Adapter.image_layouts`, the required method): grids and patch blocks.

    Capabilities: `IMAGE_NEWLINE` (layout rows of -1), `PRE_PROJECTOR_MERGE` (which `vision.features` rows
    `patch_indices` names)."""

    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the visual-token grid of one tile: the vision encoder's patch
        grid, divided by `patch_block` where tokens merge blocks of patches."""
        v = self.config.vision_config
        n = v.image_size // v.patch_size
        bh, bw = self.patch_block
        return n // bh, n // bw

    def image_grids(self, inputs: BatchFeature) -> list[tuple[int, int]]:
        """(rows, cols) of tile 0's token grid for each image of the batch (flattened in order): `grid()`,
        except for native-resolution families, where each image has its own."""
        return [self.grid()] * len(self.image_layouts(inputs))

    @property
    def patch_block(self) -> tuple[int, int]:
        """(rows, cols) of vision patches one visual token stands for: (1, 1), or the
        block a pixel-shuffle or pooling family merges into one token."""
        return 1, 1

    def features_per_token(self, inputs: BatchFeature | None) -> bool:
        """Whether `vision.features` of the batch `inputs` has one row per visual token (indexed by its
        `feature_col`), as under `PRE_PROJECTOR_MERGE`; else one per patch (`patch_indices`). LLaVA-NeXT-Video's
        video batches pool before the projector, its image batches do not."""
        return Capability.PRE_PROJECTOR_MERGE in self.capabilities

    def patch_indices(self, feature_col: torch.Tensor, inputs: BatchFeature | None = None) -> torch.Tensor:
        """`[tokens, bh * bw]`: for each token's `feature_col` (its index in the projector
        output of its tile), the indices of the patches it stands for in that tile's patch
        sequence: the tower's tokens after `n_prefix_tokens` (add it for `vision.layers`),
        which is also `vision.features` unless `PRE_PROJECTOR_MERGE`.

        `inputs` (the batch's processor output) is needed where the answer depends on the
        batch (Mistral 3's packed tower of images of different sizes); the others ignore it."""
        import torch

        bh, bw = self.patch_block
        _, gw = self.grid()
        r, c = feature_col // gw, feature_col % gw
        i, j = torch.meshgrid(torch.arange(bh, device=feature_col.device), torch.arange(bw, device=feature_col.device), indexing="ij")
        return (r[:, None] * bh + i.flatten()) * (gw * bw) + c[:, None] * bw + j.flatten()

    def _plain_layouts(self, n_images: int) -> list[torch.Tensor]:
        """Layout of families where each image is one tile, tokens in the tower's order.

        The tower's sequence is `n_cls_tokens` CLS tokens then the patches in
        row-major order; the model keeps it from `n_prefix_tokens` on. A kept CLS
        token ("full" strategy on a CLIP tower) has row = col = -1.
        """
        import torch

        h, w = self.grid()
        seq = torch.arange(self.n_prefix_tokens, self.n_cls_tokens + h * w)  # tower indices the model keeps
        patch = seq - self.n_cls_tokens
        is_patch = patch >= 0
        row = torch.where(is_patch, patch.div(w, rounding_mode="floor"), -1)
        col = torch.where(is_patch, patch % w, -1)
        fcol = seq - self.n_prefix_tokens
        return [torch.stack([torch.zeros_like(seq), row, col, torch.full_like(seq, i), fcol], dim=1) for i in range(n_images)]


class Positions:
    """Position ids and attention blocks. Capabilities: `MROPE` (`position_ids` is `[3, batch, seq]`),
    `WINDOWED_BLOCKS` (how a sliding window combines with `block_ids`)."""

    #: Position id of the first token (PaliGemma counts from 1).
    position_offset: int = 0

    def position_ids(self, inputs: BatchFeature) -> torch.Tensor:
        """`[batch, seq]` position ids each sample would get if it ran alone
        (padding does not count), as `generate` computes them; `[3, batch, seq]` under `MROPE`."""
        mask = inputs["attention_mask"].long()
        return (mask.cumsum(dim=1) - 1).clamp(min=0) + self.position_offset

    def block_ids(self, inputs: BatchFeature) -> torch.Tensor | None:
        """`[batch, seq]` ids of bidirectional attention blocks (-1: causal), or None
        when the whole sequence is causal. Tokens of one block >= 0 see each other.

        On sliding-window layers, `WINDOWED_BLOCKS` says the window also bounds the blocks (Gemma 3 ANDs the
        window with (causal OR blocks)); without it the blocks are ORed in after the window (HF's generic
        sliding mask with block ids, PaliGemma 2)."""
        return None


def packed_block_patches(feature_col: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """`[tokens, k * k]`: the rows of a packed patch sequence that each token's k x k block holds, where `sizes`
    (`[images, 2]`, patches high and wide) lays the batch's images out one after another, each row-major, and each
    image's tokens are its k x k blocks, row-major (Mistral 3's and Pixtral's merger, Gemma 4's pooler)."""
    import torch

    device = feature_col.device
    tokens = (sizes // k).prod(-1)
    token_start = torch.cumsum(tokens, 0) - tokens
    patch_start = torch.cumsum(sizes.prod(-1), 0) - sizes.prod(-1)
    image = torch.searchsorted(torch.cumsum(tokens, 0), feature_col, right=True)
    t = feature_col - token_start[image]
    gw, pw = sizes[image, 1] // k, sizes[image, 1]
    r, c = t // gw, t % gw
    i, j = torch.meshgrid(torch.arange(k, device=device), torch.arange(k, device=device), indexing="ij")
    return patch_start[image, None] + (r[:, None] * k + i.flatten()) * pw[:, None] + c[:, None] * k + j.flatten()


class PackedTower:
    """What the vision tower and projector take and give, where that is not one `[tiles, 3, H, W]` batch.

    Capability: `PACKED_TOWER` (Qwen-VL, Pixtral): the tower runs the batch's images as one packed sequence
    without a batch dimension: its sites are `[1, patches, d]` (`site_value`), every visual token has
    feature_row 0, and `pixel_values` holds one row per patch (Qwen-VL) or the padded images (Pixtral)."""

    def tower_kwargs(self, inputs: BatchFeature) -> dict[str, Any]:
        """Keyword inputs the vision tower (the module above `paths.vision_embed`) takes besides `pixel_values`:
        none, except for packed towers (Qwen-VL's ``grid_thw``, Pixtral's ``image_sizes``)."""
        return {}

    def projector_args(self, inputs: BatchFeature) -> tuple:
        """Positional inputs the projector takes after the features: none, except where it merges patches per
        image (Mistral 3's patch merger takes ``image_sizes``)."""
        return ()

    def vision_passes(self, inputs: dict) -> list[dict] | None:
        """The model's inputs for each run of the vision tower, where one forward runs it more than once (Qwen-VL on
        a batch of images and videos), for reading vision sites run by run and joining them on the patch axis; None
        (the default) where the tower runs once."""
        return None

    def tower_images(self, inputs: BatchFeature) -> torch.Tensor | None:
        """`[rows, patches]`: the image (counted over the batch) of each patch of the tower's batch, for families
        whose tower rows hold several images (`PACKED_TOWER`); None where each row is one tile of one image
        (per-image statistics of the tower, such as the ViT-norm rule, are then per row)."""
        return None

    def site_value(self, site: Site, value: torch.Tensor, inputs: BatchFeature) -> torch.Tensor:
        """A site's value as embedlens defines it, from the module's own tensor (the identity, except where a
        family's tensors need a documented view: Qwen-VL's packed tower)."""
        return value

    def display_pixels(self, inputs: BatchFeature, image: int, feature_row: int) -> torch.Tensor:
        """`[3, H, W]` normalised pixels of the tile in row `feature_row` of the vision batch, which belongs to
        image `image` (counted over the batch), as the vision tower saw them."""
        pv = inputs["pixel_values"]
        return pv.reshape(-1, *pv.shape[-3:])[feature_row]


def _pass_through(hidden_states, *args, **kwargs):
    """An encoder layer that is skipped: its output is its input."""
    return hidden_states


class VisionFeatureLayer:
    """Which encoder layers the model's image features depend on. Capability: `VISION_FEATURE_LAYER` (the
    features are the tower's ``hidden_states[config.vision_feature_layer]``, an int or a list: LLaVA's
    convention), so the layers after the deepest one selected feed nothing; traces and the intervention
    engine skip them."""

    @property
    def vision_layers_needed(self) -> int:
        """How many of the tower's encoder layers (from the first) the model's image features depend on.

        All of them, unless the family declares `VISION_FEATURE_LAYER`: then up to the deepest of
        ``config.vision_feature_layer``, counted as HF counts ``hidden_states`` (entry 0 is the
        embeddings, entry i the output of layer i - 1; -2 is the output of the last layer but one).
        """
        n = self.n_vision_layers
        if Capability.VISION_FEATURE_LAYER not in self.capabilities:
            return n
        chosen = self.config.vision_feature_layer
        chosen = [chosen] if isinstance(chosen, int) else list(chosen)
        return max(min(n, h if h >= 0 else n + 1 + h) for h in chosen)

    @contextmanager
    def unused_vision_layers_skipped(self):
        """Within this block a plain forward of `model` skips the encoder layers after
        `vision_layers_needed`: each returns its input (so ``hidden_states`` keep their count and the selected
        ones are the model's own, bit for bit). For code that runs the model outside a trace (the intervention
        engine); traces skip them through nnsight (`embedlens.tracing`)."""
        layers = list(operator.attrgetter(self.paths.vision_layers)(self.model))[self.vision_layers_needed :]  # checked at load
        own = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (accelerate's hook) or None
        for layer in layers:
            layer.forward = _pass_through
        try:
            yield
        finally:
            for layer, forward in zip(layers, own):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
