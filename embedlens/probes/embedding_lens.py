"""The embedding lens (EmbedLens): nearest vocabulary rows of every visual token."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from embedlens.errors import PlanError
from embedlens.probes._util import FIGURE_SAMPLES, FirstImage
from embedlens.probes.base import Probe, Table
from embedlens.vocab import nearest_vocab, visual_nearest, visual_nearest_layers, vocab_strings  # noqa: F401 - nearest_vocab's home until it moved to the core; importable here still
from embedlens.vocab_index import check_search
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


def lens_site(layer: int) -> Site:
    """LLM layer `l` of the lens: 0 is the LLM input (`llm.embed`), l > 0 the output of decoder layer l - 1.

    The output of the last decoder layer is read before the final norm (Hugging
    Face's ``hidden_states[-1]`` is after it; that is `llm.norm`).
    """
    return Site("llm.embed") if layer == 0 else Site("llm.layers", layer - 1)


@probes.register("embedding_lens")
class EmbeddingLens(Probe):
    """Nearest vocabulary tokens (cosine top-k) of every visual token at chosen LLM layers.

    Layer 0 is the LLM input (the projector output in place); layer l > 0 is
    the residual stream after decoder layer l - 1 (`llm.layers[l-1]`), before
    the final norm. Against Hugging Face's ``output_hidden_states``: layer l is
    ``hidden_states[l]`` for l < n_layers, but layer n_layers is the last
    decoder layer's output before the final norm, while ``hidden_states[-1]``
    is after it (`llm.norm`).

    Args:
        k: neighbours kept per token.
        layers: LLM layers to read (0..n_layers; negative counts from the end).
        matrix: "input" (the input embedding matrix, as EmbedLens) or "output" (the unembedding).
        chunk_size: vocabulary rows compared at once; bounds extra memory.
        figure_layer: layer shown in the token-map figure (default: the first of `layers`).
        search: "exact" (every vocabulary row) or "approximate" (IVF-index candidates re-ranked
            exactly; needs ``embedlens[fast]``; see `nearest_vocab`).
        n_probe: approximate search: inverted lists probed per token (more: slower, higher recall);
            default about 1 in 45 of the index's lists, at least 8 (8 for 32k rows, 18 for 152k).

    Example:
        >>> from embedlens.adapters import load_model
        >>> from embedlens.testing.images import checkerboard
        >>> from embedlens.data import Sample
        >>> from embedlens.tracing import collect
        >>> adapter = load_model("tiny:llava-clip")
        >>> batch = adapter.encode([Sample([checkerboard()], question="what is it?")])
        >>> lens = EmbeddingLens(k=3)
        >>> rows = lens.update(adapter, batch, collect(adapter, batch, lens.sites(adapter)))["tokens"]
        >>> len(rows["sample"]), int(rows["layer"][0])
        (16, 0)
    """

    def __init__(
        self,
        k: int = 3,
        layers: list[int] = [0],  # noqa: B006 - never mutated; a list reads naturally in plans
        matrix: Literal["input", "output"] = "input",
        chunk_size: int = 4096,
        figure_layer: int | None = None,
        search: Literal["exact", "approximate"] = "exact",
        n_probe: int | None = None,
    ):
        if k < 1:
            raise PlanError(f"embedding_lens.k must be >= 1; got {k}")
        if chunk_size < 1:
            raise PlanError(f"embedding_lens.chunk_size must be >= 1; got {chunk_size}")
        if matrix not in ("input", "output"):
            raise PlanError(f"embedding_lens.matrix must be 'input' or 'output'; got {matrix!r}")
        if not layers:
            raise PlanError("embedding_lens.layers must name at least one layer")
        check_search("embedding_lens", search, n_probe)
        self.k = k
        self.layers = list(layers)
        self.matrix = matrix
        self.chunk_size = chunk_size
        self.figure_layer = figure_layer
        self.search = search
        self.n_probe = n_probe
        self._counts: dict[int, torch.Tensor] = {}  # layer -> [vocab] top-1 counts
        self._names: dict[int, str] = {}  # vocabulary id -> token, for the ids counted
        self._n_tokens = 0
        self._time: dict[int, torch.Tensor] = {}  # layer -> [places, summed top-1 agreement over frames] (video)
        self._time_content: dict[int, torch.Tensor] = {}  # layer -> [content, 2]: the same per place content (video with truth)
        self._first = FirstImage(n=FIGURE_SAMPLES)
        self._first_layer: int | None = None  # the resolved figure layer (figures() has no adapter)
        self._map_layers: list[int] = []  # every resolved layer: each gets its own word map
        # the layer-by-layer summary, per token group ("all" and the run's partition groups) and layer:
        # [vocab] top-1 counts, and [tokens, with ground truth, top-1 a content word, top-1 as at the last layer]
        self._by_group: dict[tuple[str, int], torch.Tensor] = {}
        self._tally: dict[tuple[str, int], torch.Tensor] = {}

    def _resolved_layers(self, adapter: "Adapter") -> list[int]:
        n = adapter.n_llm_layers
        out = []
        for layer in self.layers:
            idx = layer + n + 1 if layer < 0 else layer
            if not 0 <= idx <= n:
                raise PlanError(
                    f"embedding_lens.layers: layer {layer} is out of range for this model (0..{n}; "
                    f"0 is the LLM input, {n} the last decoder layer's output)"
                )
            out.append(idx)
        return out

    def check(self, adapter: "Adapter") -> None:
        self._figure_layer(adapter)  # also checks `layers`

    def sites(self, adapter: "Adapter") -> list[Site]:
        return [lens_site(layer) for layer in self._resolved_layers(adapter)]

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch

        vocab = (adapter.input_embeddings() if self.matrix == "input" else adapter.output_embeddings()).detach()
        vt = batch.roles.visual_tokens()
        layers = self._resolved_layers(adapter)
        figure_layer = self._first_layer = self._figure_layer(adapter)
        # every layer searched on the device; the results leave it once, as two whole arrays
        scores, ids = visual_nearest_layers(batch, [lens_site(layer) for layer in layers], acts, vocab, self.k,
                                            self.chunk_size, self.search, self.n_probe)  # [layers, tokens, k]
        ids_h, scores_h = ids.cpu().numpy(), scores.cpu().numpy()
        names = vocab_strings(adapter.tokenizer, vocab.shape[0])  # [vocab] id -> token string
        n, n_layers = ids_h.shape[1], len(layers)
        meta = {c: vt[c].numpy() for c in ("sample", "image", "tile", "row", "col", "frame", "position")}
        sample_ids = np.array([s.id for s in batch.samples] + [None], dtype=object)[:-1]  # object: ids as given
        rows: Table = {"sample": np.tile(meta["sample"], n_layers), "sample_id": np.tile(sample_ids[meta["sample"]], n_layers)}
        for c in ("image", "tile", "row", "col", "frame", "position"):
            rows[c] = np.tile(meta[c], n_layers)
        rows["layer"] = np.repeat(np.asarray(layers, dtype=np.int64), n)
        for j in range(ids_h.shape[2]):
            col = ids_h[:, :, j].reshape(-1)
            rows[f"id_{j + 1}"] = col
            rows[f"token_{j + 1}"] = names[col]
            rows[f"score_{j + 1}"] = scores_h[:, :, j].reshape(-1)
        for li, layer in enumerate(layers):
            top = ids_h[li, :, 0]
            counts = torch.from_numpy(np.bincount(top, minlength=vocab.shape[0]))  # [vocab]
            self._counts[layer] = self._counts[layer] + counts if layer in self._counts else counts
            new = [i for i in np.unique(top).tolist() if i not in self._names]
            self._names.update(zip(new, names[new].tolist()))
        self._map_layers = layers
        decoded = {layer: names[ids_h[li, :, 0]] for li, layer in enumerate(layers)}  # layer -> [tokens] top-1 words
        self._first.offer(adapter, batch, vt, tokens=decoded[figure_layer], **{f"tokens_l{la}": decoded[la] for la in layers})
        self._summarise(batch, vt, {layer: ids[li, :, 0] for li, layer in enumerate(layers)}, names[np.unique(ids_h[:, :, 0])],
                        vocab.shape[0])
        self._n_tokens += n
        out = {"tokens": rows}
        if bool((vt["frame"] >= 0).any()):  # a video batch: does a place read the same word in every frame?
            out["frames"] = self._over_time(batch, vt, layers, ids[:, :, 0])
        return out

    def _over_time(self, batch: "Batch", vt: dict[str, torch.Tensor], layers: list[int], top1: torch.Tensor) -> Table:
        """One row per layer and place of the frame grid (sample, image, row, col): its frames and how many read
        its most frequent top-1 word; the run's tally per layer (places, summed agreement) for ``frame_agreement``."""
        import torch

        from embedlens.probes.over_time import CONTENT, place_content, top1_agreement

        rows: Table = {c: [] for c in ("sample_id", "image", "row", "col", "content", "layer", "n_frames", "n_agree", "agreement")}
        names = list(CONTENT) + ["unknown"]
        content = None
        for li, layer in enumerate(layers):
            keys, n_frames, n_agree = top1_agreement(vt, top1[li])
            share = n_agree / n_frames
            k = keys.cpu()
            if content is None:  # the places are the same at every layer
                content = place_content(batch, keys)  # static background / static object / moving, -1 without truth
                content_names = [names[c] for c in content.cpu().tolist()]
            rows["sample_id"] += [batch.samples[i].id for i in k[:, 0].tolist()]
            for j, c in enumerate(("image", "row", "col")):
                rows[c] += k[:, j + 1].tolist()
            rows["content"] += content_names
            sets = torch.stack([content == i for i in range(len(CONTENT))]).double()  # [content, places]
            by = torch.stack([sets.sum(1), sets @ share.double()], dim=1).cpu()  # [content, 2]: places, summed agreement
            self._time_content[layer] = self._time_content[layer] + by if layer in self._time_content else by
            rows["layer"] += [layer] * len(k)
            rows["n_frames"] += n_frames.tolist()
            rows["n_agree"] += n_agree.tolist()
            rows["agreement"] += share.tolist()
            tally = torch.stack([torch.tensor(float(len(k)), dtype=torch.float64), share.double().sum().cpu()])
            self._time[layer] = self._time[layer] + tally if layer in self._time else tally
        return rows

    def _summarise(self, batch: "Batch", vt: dict[str, torch.Tensor], top1: dict[int, torch.Tensor], top1_names: np.ndarray,
                   n_vocab: int) -> None:
        """Fold one batch into the layer-by-layer summary (per group: top-1 counts, content-word share where the
        samples have ground truth, agreement with the last layer read). `top1` holds each layer's [tokens] top-1 ids on
        the device; `top1_names` the words of their distinct ids, in id order (decoded once, by the caller)."""
        import torch

        if not top1:
            return
        dev = next(iter(top1.values())).device
        s_idx, pos = vt["sample"].to(dev), vt["position"].to(dev)
        groups = {"all": torch.ones_like(s_idx, dtype=torch.bool)}
        for g, mask in (batch.groups or {}).items():
            groups[g] = mask.to(dev)[s_idx, pos]  # [tokens]
        # content words of each image (colours, shapes, the written word) where the data has ground truth
        truth = torch.tensor([isinstance(s.meta.get("patch_labels"), dict) for s in batch.samples], device=dev)[s_idx]
        words = [_content_words(s.meta) for s in batch.samples]
        ids = torch.unique(torch.cat(list(top1.values())))  # [unique ids], sorted: the order of top1_names
        names = [_plain(t) for t in top1_names]
        is_content = torch.tensor([[w in ws for w in names] for ws in words], dtype=torch.bool, device=dev)  # [batch, unique ids]
        last = top1[max(top1)]
        member = torch.stack(list(groups.values())).float()  # [groups, tokens]
        g_off = torch.arange(len(groups), device=dev)[:, None] * n_vocab  # [groups, 1]
        counts, tallies = [], []
        for t in top1.values():  # on the device; one transfer for the whole batch below
            content = (is_content[s_idx, torch.searchsorted(ids, t.contiguous())] & truth).float()
            per = torch.stack([torch.ones_like(content), truth.float(), content, (t == last).float()], dim=1)  # [tokens, 4]
            tallies.append(member @ per)  # [groups, 4]
            counts.append(torch.bincount((g_off + t[None, :]).flatten(), weights=member.flatten(),
                                         minlength=len(groups) * n_vocab).view(len(groups), n_vocab))
        counts_h = torch.stack(counts).round().long().cpu()  # [layers, groups, vocab]
        tallies_h = torch.stack(tallies).round().long().cpu()  # [layers, groups, 4]
        for li, layer in enumerate(top1):
            for gi, g in enumerate(groups):
                key = (g, layer)
                c, tl = counts_h[li, gi], tallies_h[li, gi]  # views: copied when first kept (a checkpoint saves each alone)
                self._by_group[key] = self._by_group[key] + c if key in self._by_group else c.clone()
                self._tally[key] = self._tally[key] + tl if key in self._tally else tl.clone()

    def _figure_layer(self, adapter: "Adapter") -> int:
        layers = self._resolved_layers(adapter)
        if self.figure_layer is None:
            return layers[0]
        fl = self.figure_layer + adapter.n_llm_layers + 1 if self.figure_layer < 0 else self.figure_layer
        if fl not in layers:
            raise PlanError(f"embedding_lens.figure_layer: {self.figure_layer} must be one of layers {self.layers}")
        return fl

    def result(self) -> dict[str, Any]:
        top = {}
        for layer, counts in self._counts.items():
            c, i = counts.topk(min(10, int((counts > 0).sum())))
            top[str(layer)] = [{"id": a, "token": self._names.get(a, str(a)), "count": b} for a, b in zip(i.tolist(), c.tolist())]
        return {"n_visual_tokens": self._n_tokens, "most_frequent_top1_ids": top, "k": self.k, "matrix": self.matrix,
                "search": self.search, "layer_summary": self.layer_summary(),
                **({"frame_agreement": {str(la): float(t[1] / t[0]) for la, t in sorted(self._time.items())}} if self._time else {}),
                **({"frame_agreement_by_content": self._agreement_by_content()} if self._agreement_by_content() else {})}

    def _agreement_by_content(self) -> dict[str, Any]:
        """Per place content (static background, static object, moving: videos with per-frame truth): the places
        and their mean top-1 agreement over frames at each layer. Static content the model sees the same way in
        every frame reads one word: agreement 1."""
        from embedlens.probes.over_time import CONTENT

        out = {}
        for i, c in enumerate(CONTENT):
            per = {str(la): t[i] for la, t in sorted(self._time_content.items())}
            if per and float(next(iter(per.values()))[0]) > 0:
                out[c] = {"places": int(next(iter(per.values()))[0]), **{la: float(t[1] / t[0]) for la, t in per.items()}}
        return out

    def layer_summary(self) -> dict[str, Any]:
        """Per token group (``all``, and sink / dead / alive where the run has a partition) and layer: the most
        frequent top-1 words, the share of tokens whose top-1 is a content word of their image (a colour, shape or
        written word of the synthetic data's ground truth; None without it), and the share whose top-1 is the
        one at the last layer read (`final_layer`)."""
        out: dict[str, Any] = {"final_layer": max(self._map_layers) if self._map_layers else None, "groups": {}}
        for (g, layer), counts in sorted(self._by_group.items(), key=lambda kv: (kv[0][0] != "all", kv[0][0], kv[0][1])):
            n, with_truth, content, agree = (int(v) for v in self._tally[(g, layer)].tolist())
            k = min(5, int((counts > 0).sum()))
            c, i = counts.topk(k)
            out["groups"].setdefault(g, {})[str(layer)] = {
                "n_tokens": n,
                "top1": [{"token": self._names.get(a, str(a)), "count": b} for a, b in zip(i.tolist(), c.tolist())],
                "content_word_share": content / with_truth if with_truth else None,
                "agrees_with_final_layer": agree / n if n else None,
            }
        return out

    def figures(self, out_dir: Path) -> list[Path]:
        """One word map per layer read (the figure layer first), the same samples on each."""
        images = self._first.images
        if not images:
            return []
        from embedlens.figures import word_map

        layers = [self._first_layer] + [la for la in self._map_layers if la != self._first_layer]
        shown = ", ".join(dict.fromkeys(str(im["sample_id"]) for im in images))
        frames = [im["frame"] for im in images if im.get("frame", -1) >= 0]
        what = (f"{len(frames)} frames of {len(dict.fromkeys(im['sample_id'] for im in images))} video(s) ({shown}), one panel "
                "per frame (temporal patch) with its tokens") if frames else f"the first {len(images)} samples ({shown})"
        out = []
        for layer in layers:
            key = f"tokens_l{layer}"
            if not all(key in im for im in images):
                key = "tokens"  # images kept before every layer was offered (a resumed older state): the figure layer's
                if layer != self._first_layer:
                    continue
            path = Path(out_dir) / f"embedding_lens_layer{layer}.png"
            panels = [{**im, "labels": im[key]} for im in images]
            word_map(panels, path, title=f"Nearest vocabulary token per patch, LLM layer {layer} ({self.matrix} embeddings), "
                     f"{what}: each patch coloured by its word, the most frequent in the "
                     "legend, words written where they fit")
            out.append(path)
        return out


def _plain(token: str) -> str:
    """A vocabulary piece as a plain lower-case word (SentencePiece's ▁ and GPT-2's Ġ marks dropped)."""
    return str(token).replace("\u2581", " ").replace("\u0120", " ").strip().lower()


def _content_words(meta: dict) -> set[str]:
    """The content words of a sample's image from its ground truth: colours, shapes and the written word."""
    labels = meta.get("patch_labels")
    if not isinstance(labels, dict):
        return set()
    out = {str(v).lower() for key in ("colour", "shape") for row in labels.get(key, []) or [] for v in row if v}
    if isinstance(meta.get("word"), str) and meta["word"]:
        out.add(meta["word"].lower())
    return out
