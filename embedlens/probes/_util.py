"""Helpers shared by the probes: layer resolution, token tables, bounded aggregation."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Sequence

from embedlens.adapters.capabilities import Capability
from embedlens.errors import PlanError
from embedlens.state import Stateful, rebuildable

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch

from embedlens.probes.base import Table

META_COLUMNS = ("sample", "sample_id", "image", "tile", "row", "col", "frame", "position")


def records_given(init):
    """Wrap `init` to keep the names of the arguments a caller wrote (``self._given``), whatever their values: a
    value written equal to the default is still the caller's choice. The signature stays `init`'s (``__wrapped__``)."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        self._given = frozenset(inspect.signature(init).bind(self, *args, **kwargs).arguments) - {"self"}
        init(self, *args, **kwargs)

    return wrapper


def resolve_layers(probe: str, param: str, layers: Sequence[int], n: int, *, include_input: bool = True) -> list[int]:
    """Resolve lens layers: 0..n with 0 the LLM input (``include_input``) or 0..n-1 decoder layers.

    Negative values count from the end. Raises `PlanError` naming ``probe.param``.
    """
    hi = n if include_input else n - 1
    out = []
    for layer in layers:
        idx = layer + hi + 1 if layer < 0 else layer
        if not 0 <= idx <= hi:
            what = f"0..{n}; 0 is the LLM input, {n} the last decoder layer's output" if include_input else f"0..{n - 1}"
            raise PlanError(f"{probe}.{param}: layer {layer} is out of range for this model ({what})")
        out.append(idx)
    if not out:
        raise PlanError(f"{probe}.{param}: name at least one layer")
    return out


def token_meta(batch: "Batch", vt: dict[str, torch.Tensor]) -> Table:
    """The identifying columns of one row per visual token."""
    rows: Table = {"sample": vt["sample"].tolist()}
    rows["sample_id"] = [batch.samples[s].id for s in rows["sample"]]
    for c in ("image", "tile", "row", "col", "frame", "position"):
        rows[c] = vt[c].tolist()
    return rows


def token_groups(batch: "Batch", sample: torch.Tensor, position: torch.Tensor) -> list[str]:
    """The group of each token from the run's partition (``batch.groups``); ``"visual"`` without one."""
    if not batch.groups:
        return ["visual"] * len(sample)
    out = ["visual"] * len(sample)
    for g, mask in batch.groups.items():
        hit = mask[sample, position].tolist()
        out = [g if h and o == "visual" else o for o, h in zip(out, hit)]
    return out


def parse_selections(probe: str, param: str, names: Sequence[str]) -> dict[str, Any]:
    """Parse token selections (role names or expressions) for a probe parameter; `PlanError` naming it."""
    from embedlens.errors import EmbedLensError
    from embedlens.interventions.select import Selection

    if not names:
        raise PlanError(f"{probe}.{param}: name at least one token selection, e.g. [last]")
    try:
        return {q: Selection.parse(q) for q in names}
    except EmbedLensError as e:
        raise PlanError(f"{probe}.{param}: {e}") from None


def selection_masks(probe: str, param: str, selections: dict[str, Any], batch: "Batch") -> dict[str, torch.Tensor]:
    """``{name: [batch, seq] bool}`` for each selection on this batch (groups from ``batch.groups``), padding excluded."""
    from embedlens.errors import EmbedLensError

    groups = (lambda g: batch.groups[g]) if batch.groups else None
    out = {}
    for q, sel in selections.items():
        try:
            out[q] = sel.evaluate(batch.roles, groups) & ~batch.roles.padding
        except EmbedLensError as e:
            raise PlanError(f"{probe}.{param}: {e}") from None
    return out


def group_masks(groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{group: [tokens] bool}`` from one group name per token (groups in order of first appearance)."""
    import torch

    names = list(dict.fromkeys(groups))
    idx = torch.tensor([names.index(g) for g in groups], dtype=torch.long)
    return {g: idx == i for i, g in enumerate(names)}


@rebuildable
class Reservoir(Stateful):
    """A uniform sample of at most `capacity` rows from a stream (Algorithm R), reproducible by seed.

    Rows are tensors ``[n, d]`` with optional parallel label lists.

    Example:
        >>> import torch
        >>> r = Reservoir(3, seed=0)
        >>> r.add(torch.arange(10.0)[:, None], label=list("abcdefghij"))
        >>> r.rows().shape, len(r.labels["label"]), r.seen
        (torch.Size([3, 1]), 3, 10)
    """

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.seen = 0
        self._rows: list[torch.Tensor] = []
        self.labels: dict[str, list[Any]] = {}
        # the seed until the generator is first needed: building a probe (``embedlens validate``) imports no torch
        self._gen: torch.Generator | int = seed

    def _generator(self) -> torch.Generator:
        """The seeded generator, made on first use (the same draws as one made in the constructor)."""
        import torch

        if not isinstance(self._gen, torch.Generator):
            self._gen = torch.Generator().manual_seed(self._gen)
        return self._gen

    def state_dict(self) -> dict[str, Any]:
        self._generator()  # saved as a generator, as it always was
        return super().state_dict()

    def add(self, rows: torch.Tensor, **labels: Sequence[Any]) -> None:
        import torch

        self._generator()
        rows = rows.detach().float().cpu()
        for i in range(rows.shape[0]):
            self.seen += 1
            if len(self._rows) < self.capacity:
                slot = len(self._rows)
                self._rows.append(rows[i])
                for k, v in labels.items():
                    self.labels.setdefault(k, []).append(v[i])
                continue
            slot = int(torch.randint(self.seen, (1,), generator=self._gen))
            if slot < self.capacity:
                self._rows[slot] = rows[i]
                for k, v in labels.items():
                    self.labels[k][slot] = v[i]

    def rows(self) -> torch.Tensor:
        import torch

        return torch.stack(self._rows) if self._rows else torch.zeros(0, 0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A saved reservoir, checked: at most `capacity` finite float32 rows of one shape, a label per row, `seen` >= rows."""
        import torch

        from embedlens.state import CheckpointError

        if "_gen" in vars(self):  # built from the plan (not rebuilt blank from a checkpoint): a generator to load into
            self._generator()
        super().load_state_dict(state)
        rows, cap = self._rows, self.capacity
        ok = (isinstance(rows, list) and all(isinstance(r, torch.Tensor) and r.dtype == torch.float32 and r.shape == rows[0].shape
                                             and bool(torch.isfinite(r).all()) for r in rows)
              and isinstance(cap, int) and 0 <= len(rows) <= cap and isinstance(self.seen, int) and self.seen >= len(rows)
              and isinstance(self.labels, dict) and all(isinstance(v, list) and len(v) == len(rows) for v in self.labels.values()))
        if not ok:
            raise CheckpointError(f"Reservoir: the saved rows, labels and counts do not fit together ({len(rows) if isinstance(rows, list) else rows!r} "
                                  f"rows of capacity {cap!r}, seen {self.seen!r}); expected finite float32 rows of one shape, a label each")

    def __len__(self) -> int:
        return len(self._rows)


@rebuildable
class Histogram(Stateful):
    """Counts of values in fixed bins over ``[lo, hi]`` (values outside go to the end bins)."""

    def __init__(self, lo: float, hi: float, bins: int = 40):
        import torch

        self.edges = torch.linspace(lo, hi, bins + 1)
        self.counts = torch.zeros(bins, dtype=torch.long)

    def add(self, values: torch.Tensor) -> None:
        import torch

        idx = torch.bucketize(values.float().cpu().clamp(self.edges[0], self.edges[-1]), self.edges[1:-1])
        self.counts += torch.bincount(idx, minlength=len(self.counts))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A saved histogram, checked: ascending edges, one count >= 0 per bin."""
        import torch

        from embedlens.state import CheckpointError

        super().load_state_dict(state)
        e, c = self.edges, self.counts
        ok = (isinstance(e, torch.Tensor) and isinstance(c, torch.Tensor) and e.dim() == 1 and c.dim() == 1 and e.is_floating_point()
              and c.dtype == torch.long and len(e) == len(c) + 1 and bool((e[1:] > e[:-1]).all()) and bool((c >= 0).all()))
        if not ok:
            raise CheckpointError("Histogram: the saved edges and counts do not fit together; expected ascending edges and "
                                  "one count >= 0 per bin")

    def to_dict(self) -> dict[str, list]:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist()}


#: Samples drawn side by side in a word map (`embedlens.figures.word_map`).
FIGURE_SAMPLES = 4


@rebuildable
class FirstImage(Stateful):
    """What a token-map figure needs from the first images of a run (image 0, tile 0 of the first `n` samples).

    `data` is the first one (figures of one image); `images` all that were kept. A video sample gives one
    entry per frame (a token's `frame`: Qwen's temporal patch), each with that frame's pixels and tokens and
    its ``frame``; `n` then counts entries, but the first video is always kept whole. Off video ``frame`` is -1.
    """

    def __init__(self, n: int = 1):
        self.n = n
        self.data: dict[str, Any] | None = None
        self.more: list[dict[str, Any]] = []

    @property
    def images(self) -> list[dict[str, Any]]:
        return ([self.data] if self.data is not None else []) + list(self.more)

    @property
    def frames(self) -> list[dict[str, Any]]:
        """The entries of the first sample kept (one per frame of a video; one entry for an image)."""
        return [e for e in self.images if e["sample_id"] == self.data["sample_id"]] if self.data is not None else []

    def offer(self, adapter: "Adapter", batch: "Batch", vt: dict[str, torch.Tensor], **per_token: Sequence[Any]) -> None:
        """Keep the first images' patches with one value per visual token of `vt` for each keyword."""
        for b in range(len(batch.samples)):
            if len(self.images) >= self.n:
                return
            first = (vt["sample"] == b) & (vt["image"] == 0) & (vt["tile"] == 0)
            frames = sorted(set(vt["frame"][first].tolist()))  # [-1] off video; small: one sample's frames
            if not frames:
                continue
            if self.images and len(self.images) + len(frames) > self.n:
                return  # a later video kept whole or not at all
            for f in frames:
                sel = (first & (vt["frame"] == f)).nonzero().flatten().tolist()
                frow = int(vt["feature_row"][sel[0]])
                entry = {
                    "sample_id": batch.samples[b].id,
                    "frame": f,
                    "pixels": display_pixels(adapter, batch.inputs, frow, image=batch_image(batch, b, int(vt["image"][sel[0]])),
                                             frame=max(f, 0)),
                    "row": [int(vt["row"][i]) for i in sel],
                    "col": [int(vt["col"][i]) for i in sel],
                    **{k: [v[i] for i in sel] for k, v in per_token.items()},
                }
                if self.data is None:
                    self.data = entry
                else:
                    self.more.append(entry)


def frame_maps(first: FirstImage, out_dir, stem: str, draw) -> list:
    """One token map per entry of the first sample `first` kept: ``{stem}.png`` for an image, and for a video
    ``{stem}_frame{t}.png`` per frame (temporal patch) t, each with that frame's tokens over its pixels.

    `draw(entry, path, where)` writes one map and returns its path; `where` is ``""`` for an image and
    ``", frame t of n"`` for a video's frame, to end its title with."""
    from pathlib import Path

    frames = first.frames
    out = []
    for e in frames:
        f = e.get("frame", -1)
        path = Path(out_dir) / (f"{stem}.png" if f < 0 else f"{stem}_frame{f}.png")
        out.append(draw(e, path, "" if f < 0 else f", frame {f} of {len(frames)}"))
    return out


def visual_rows(adapter: "Adapter", site, act: torch.Tensor, vt: dict[str, torch.Tensor], inputs=None) -> torch.Tensor:
    """``[tokens, d]``: the activation at `site` of each visual token of `vt`.

    LLM sites and the projector output are indexed by (sample, position) and
    (vision row, token); the tower's sites by the token's row of the vision batch
    and its patch (after CLIP's CLS for vision layers). Where a token stands for
    a block of patches (`Adapter.patch_block`, e.g. Idefics3's pixel shuffle), a
    tower site gives the mean over the block's patches. `inputs`, the batch's
    processor output, names the patches where they depend on the batch
    (`Adapter.patch_indices`: Mistral 3's packed images of different sizes).
    ``llm.layers[i].experts`` (`[batch, seq, top_k]` expert ids) gives each token's routing as a multi-hot row,
    ``[tokens, n_experts]`` (1.0 at the experts it was routed to), so a probe reading vectors reads routing.
    """
    import torch

    comp = site.component
    if site.sub == "experts":
        ids = act[vt["sample"].to(act.device), vt["position"].to(act.device)]  # [tokens, top_k]
        return torch.zeros(ids.shape[0], adapter.n_experts, device=act.device).scatter_(1, ids, 1.0)
    if comp.startswith("llm."):
        return act[vt["sample"].to(act.device), vt["position"].to(act.device)]
    rows = vt["feature_row"].to(act.device)
    if comp == "projector" or (comp == "vision.features" and adapter.features_per_token(inputs)):
        return act[rows, vt["feature_col"].to(act.device)]
    cols = adapter.patch_indices(vt["feature_col"], inputs) + (adapter.n_prefix_tokens if comp in ("vision.layers", "vision.embed") else 0)
    return act[rows[:, None], cols.to(act.device)].mean(dim=1)  # [tokens, block, d] -> [tokens, d]


def parse_site(probe: str, param: str, adapter: "Adapter", name: str):
    """Resolve a site name for a probe parameter; `PlanError` naming ``probe.param`` when it is wrong."""
    from embedlens.errors import EmbedLensError

    try:
        site = adapter.resolve(name)
    except EmbedLensError as e:
        raise PlanError(f"{probe}.{param}: {e}") from None
    if site.component == "llm.unembed" or site.component == "llm.norm":
        raise PlanError(f"{probe}.{param}: {name} has no per-token residual vectors to compare; use llm.embed or llm.layers[i]")
    return site


def batch_image(batch: "Batch", sample: int, image: int) -> int:
    """The batch-wide index of image `image` of sample `sample` (a video counts as one), which packed towers'
    `Adapter.display_pixels` take (Qwen-VL, Mistral 3: the batch's images in order)."""
    return sum(len(s.images) or int(s.video is not None) for s in batch.samples[:sample]) + image


def display_pixels(adapter: "Adapter", inputs, feature_row: int, image: int = 0, frame: int = 0) -> torch.Tensor:
    """`[H, W, 3]` in 0..1: the tile the vision tower saw (`Adapter.display_pixels`), un-normalised for display;
    of a video, temporal patch `frame` (its first frame), which the video families' `display_pixels` take."""
    import torch

    pv = (adapter.display_pixels(inputs, image, feature_row, frame=frame) if frame else adapter.display_pixels(inputs, image, feature_row)).float()
    ip = adapter.processor.image_processor
    mean = torch.tensor(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0])[:, None, None]
    std = torch.tensor(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0])[:, None, None]
    return (pv.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)
