"""Ablation: replace selected image tokens with zeros, the data-set mean, or a vocabulary word's embedding."""

from __future__ import annotations

from typing import Literal

from embedlens.errors import InterventionError
from embedlens.interventions.base import IfEmpty, Intervention, parse_selection, require_nonempty
from embedlens.interventions.context import Context, Rows
from embedlens.interventions.select import SelectionSpec
from embedlens.registry import interventions
from embedlens.sites import Site


@interventions.register("ablate")
class Ablate(Intervention):
    """Replace selected image tokens with zeros, the data-set mean or a word's input embedding at a site.

    `site` is ``llm.embed`` (the LLM input: projector outputs) or
    ``llm.layers[i]`` (the residual stream after layer i). With
    ``value: mean`` the mean over the `mean_over` tokens of the whole data set
    at that site is computed in an earlier pass of the same run (Neo et al.
    mean-ablate object patches). With ``value: word`` the tokens become the
    input-embedding row of `word` (one token of the vocabulary, or an id), at
    ``llm.embed`` only: e.g. dead tokens replaced by their anchor word, which
    keeps their slots in the sequence but drops whatever they still carried.

    Args:
        tokens: the image tokens replaced.
        value: ``zero``, ``mean`` (the data-set mean of the `mean_over` tokens at `site`, fitted in an
            earlier pass) or ``word`` (the input embedding of `word`).
        site: ``llm.embed`` (the LLM input) or ``llm.layers[i]`` (the residual stream after layer i).
        mean_over: the tokens the data-set mean is taken over (``value: mean``).
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.
        word: for ``value: word``: one vocabulary token (text) or an id; ``llm.embed`` only.

    Example:
        >>> Ablate(tokens="visual and row < 2", value="zero").value
        'zero'
        >>> Ablate(tokens="dead", value="word", word="background").word
        'background'
    """

    def __init__(
        self,
        tokens: SelectionSpec,
        value: Literal["zero", "mean", "word"] = "mean",
        site: str = "llm.embed",
        mean_over: SelectionSpec = "visual",
        if_empty: IfEmpty = "error",
        word: str | int | None = None,
    ):
        if value not in ("zero", "mean", "word"):
            raise InterventionError(f"value: must be 'zero', 'mean' or 'word'; got {value!r}")
        if (value == "word") != (word is not None):
            raise InterventionError("word: give a word (or vocabulary id) exactly when value is 'word'"
                                    + (f"; got value {value!r} and word {word!r}" if word is not None else ""))
        if value == "word" and site != "llm.embed":
            raise InterventionError(f"site: value 'word' replaces tokens at the LLM input (llm.embed); got {site!r}")
        self.tokens, self.value, self.site, self.mean_over, self.if_empty = tokens, value, site, mean_over, if_empty
        self.word = word
        self._word_vec: torch.Tensor | None = None
        self.selection = parse_selection(tokens, "tokens")
        self.mean_sel = parse_selection(mean_over, "mean_over")
        try:
            parsed = Site.parse(site)
        except Exception as exc:
            raise InterventionError(f"site: {exc}") from None
        if parsed.component not in ("llm.embed", "llm.layers") or parsed.sub is not None:
            raise InterventionError(f"site: ablate acts on llm.embed or llm.layers[i]; got {site!r}")
        self._site = parsed
        self.mean: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0

    @property
    def needs_fit(self) -> bool:
        return self.value == "mean"

    def check(self, adapter) -> None:
        try:
            self._resolved = adapter.resolve(self._site)
        except Exception as exc:
            raise InterventionError(f"site: {exc}") from None
        if self.value == "word":
            emb = adapter.input_embeddings()
            self._word_vec = emb[word_id(adapter.tokenizer, self.word, emb.shape[0])].detach()

    # -- the data-set mean ---------------------------------------------------------
    def fit_sites(self, adapter) -> list[Site]:
        self.check(adapter)
        return [self._resolved] if self.value == "mean" else []

    def observe(self, adapter, batch, acts) -> None:
        x = acts[self._resolved].double()
        mask = self.mean_sel.evaluate(batch.roles) & batch.roles.image_span
        mask = mask.to(x.device)
        s = x[mask].sum(dim=0)
        self._sum = s if self._sum is None else self._sum + s
        self._count += int(mask.sum())

    def finish_fit(self) -> None:
        if self.value != "mean":
            return
        if not self._count:
            raise InterventionError(f"mean_over: selection {self.mean_over!r} matched no image token in the data set")
        self.mean = self._sum / self._count

    # -- the edit ------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        self.check(ctx.adapter)
        if self.value == "mean" and self.mean is None:
            raise InterventionError("value: mean needs the data-set mean; run the condition's fit pass first")
        self._mask = ctx.select(self.selection, within=ctx.roles.image_span)
        require_nonempty(ctx, self._mask, "tokens", self.tokens, self.if_empty, what="image")

    def _fill(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        if self.value == "zero":
            fill = torch.zeros((), dtype=x.dtype, device=x.device)
        else:
            fill = (self.mean if self.value == "mean" else self._word_vec).to(x)
        return torch.where(mask[..., None], fill, x)

    def edit_embeds(self, ctx: Context, embeds: torch.Tensor) -> torch.Tensor:
        return self._fill(embeds, self._mask) if self._resolved.component == "llm.embed" else embeds

    def after_layer(self, ctx: Context, layer: int, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        if self._resolved.component == "llm.layers" and self._resolved.layer == layer:
            return self._fill(hidden, rows.gather(self._mask) & rows.valid)
        return hidden


def word_id(tokenizer, word: str | int, vocab_size: int) -> int:
    """The vocabulary id of `word`: an id as given, else the token itself, else the one token the text encodes to."""
    if isinstance(word, int) and not isinstance(word, bool):
        if not 0 <= word < vocab_size:
            raise InterventionError(f"word: id {word} is outside the vocabulary (0..{vocab_size - 1})")
        return word
    if not isinstance(word, str) or not word:
        raise InterventionError(f"word: expected a word or a vocabulary id; got {word!r}")
    i = tokenizer.convert_tokens_to_ids(word)
    if i is not None and i != tokenizer.unk_token_id:
        return int(i)
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise InterventionError(f"word: {word!r} is not one token of this vocabulary (it encodes to {len(ids)} ids: {ids}); give an id")
    return int(ids[0])


@interventions.register("ablate_random_matched")
class AblateRandomMatched(Ablate):
    """Matched random control for `ablate`: replace as many tokens as `target` has, drawn at random from the rest.

    The draw is the one `prune_random_matched` makes (seeded per sample by the
    seed, the sample id and its tokens); the replacement is `ablate`'s (zeros
    or the data-set mean at `site`).

    Args:
        target: the selection whose size is matched per sample.
        seed: seeds the per-sample draw (the one `prune_random_matched` makes).
        pool: the tokens the draw is made from.
        value: as `ablate`.
        site: as `ablate`.
        mean_over: as `ablate`.
        if_empty: ``error`` (the default) when some sample's selection is empty, or ``noop`` to leave such
            samples unchanged.
        exclude_target: draw from the pool outside the target (``false``: from the whole pool).
        word: as `ablate`.
        per_frame: match the count frame by frame, as `prune_random_matched`.

    Example:
        >>> AblateRandomMatched(target="dead", value="zero").target
        'dead'
    """

    def __init__(
        self,
        target: SelectionSpec,
        seed: int = 0,
        pool: SelectionSpec = "visual",
        value: Literal["zero", "mean", "word"] = "mean",
        site: str = "llm.embed",
        mean_over: SelectionSpec = "visual",
        if_empty: IfEmpty = "error",
        exclude_target: bool = True,
        word: str | int | None = None,
        per_frame: bool = False,
    ):
        super().__init__(target, value=value, site=site, mean_over=mean_over, if_empty=if_empty, word=word)
        self.target, self.seed, self.pool, self.exclude_target = target, seed, pool, exclude_target
        self.per_frame = per_frame
        self.target_sel = parse_selection(target, "target")
        self.pool_sel = parse_selection(pool, "pool")

    def setup(self, ctx: Context) -> None:
        from embedlens.interventions.prune import draw_matched

        self.check(ctx.adapter)
        if self.value == "mean" and self.mean is None:
            raise InterventionError("value: mean needs the data-set mean; run the condition's fit pass first")
        self._mask = draw_matched(ctx, self.target_sel, self.target, self.pool_sel, self.pool, self.seed, self.if_empty,
                                  self.exclude_target, self.per_frame)
