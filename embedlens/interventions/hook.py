"""`Hook`: a plain Python function as an intervention, for a one-off idea without a plugin package.

The function is called where the engine calls interventions (`embedlens.interventions.base`):
at a named site it gets the value there and returns the new value; without a site it gets
the batch's `Context` before the first layer and may move tokens out (``ctx.exit``) or in.
It is not registered (a function cannot be written in a YAML plan); pass it to
`embedlens.intervene` or to `Engine.run` directly.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch

from embedlens.errors import InterventionError
from embedlens.interventions.base import Intervention, parse_selection
from embedlens.interventions.context import Context, Rows
from embedlens.interventions.select import SelectionSpec
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter

#: The sites a hook can edit: what the engine holds between its steps.
HOOK_SITES = ("llm.embed", "llm.layers[i].in", "llm.layers[i]")


class Hook(Intervention):
    """Call `fn` at `site` on every batch; what it returns replaces the value there.

    - ``site="llm.embed"``: ``fn(x)`` with ``x`` the LLM's input embeddings, `[batch, seq, d]`
      (images merged in);
    - ``site="llm.layers[i]"``: the residual stream leaving decoder layer ``i``; ``"llm.layers[i].in"``:
      entering it (``llm.layers[0].in`` is ``llm.embed``). ``x`` is `[batch, seq, d]` over the batch's
      positions (a token an intervention removed is zero there and stays out);
    - ``site=None``: ``fn(ctx)`` once per batch before the first layer, with the batch's `Context`:
      read ``ctx.roles`` / ``ctx.select("dead")``, remove tokens by lowering ``ctx.exit``, ... (as a
      plugin's ``setup``); what it returns is ignored.

    With a site, a function of two parameters gets ``(x, ctx)``. It returns a tensor of ``x``'s shape, or
    None when it edited ``x`` in place (``x`` is the hook's own copy). Only the `tokens` positions take the
    new value (default: every position).

    Args:
        fn: the function.
        site: one of `HOOK_SITES` (negative layers count from the end), or None (see above).
        tokens: a selection (``visual``, ``dead``, ``visual and row < 3``) restricting where the new value
            is written; None: everywhere.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.interventions.engine import Engine
        >>> adapter, batch = tiny_batch("llava-clip", n=2)
        >>> zero = Hook(lambda x: x * 0, site="llm.embed", tokens="visual")
        >>> zero.check(adapter)
        >>> Engine(adapter).run(batch, [zero]).context.edited.sum().item() == batch.roles.visual.sum().item()
        True
    """

    registered_name = "hook"  # names it in errors and tables; not in the registry (a function is not plan data)

    def __init__(self, fn: Callable[..., Any], site: str | None = None, tokens: SelectionSpec | None = None):
        if not callable(fn):
            raise InterventionError(f"fn: expected a function; got {type(fn).__name__}")
        if tokens is not None and site is None:
            raise InterventionError("tokens: restricts where a site's new value is written; a hook without a site "
                                    "(fn(ctx)) selects its tokens itself")
        self.fn, self.site, self.tokens = fn, site, tokens
        self.selection = parse_selection(tokens, "tokens") if tokens is not None else None
        self._with_ctx = site is not None and _required_positional(fn) >= 2
        self._site: Site | None = None
        if site is not None:
            try:
                parsed = Site.parse(site)
            except Exception as exc:  # noqa: BLE001 - Site.parse names the problem
                raise InterventionError(f"site: {exc}") from None
            if not (parsed.component == "llm.embed" and parsed.sub is None
                    or parsed.component == "llm.layers" and parsed.sub in (None, "in")):
                raise InterventionError(f"site: a hook edits {', '.join(HOOK_SITES)}; got {site!r}")
            self._site = parsed
        self._at: int | None = None  # the layer after which the value is edited; -1: the LLM input
        self._mask: torch.Tensor | None = None

    def check(self, adapter: "Adapter") -> None:
        if self._site is None:
            return
        try:
            site = adapter.resolve(self._site)
        except Exception as exc:  # noqa: BLE001 - the adapter's error names the range
            raise InterventionError(f"site: {exc}") from None
        if site.component == "llm.embed":
            self._at = -1
        else:  # leaving layer i, or entering it: leaving layer i - 1 (the LLM input for i = 0)
            self._at = site.layer - 1 if site.sub == "in" else site.layer

    def setup(self, ctx: Context) -> None:
        if self._site is None:
            self.fn(ctx)
            return
        self.check(ctx.adapter)
        self._mask = ctx.select(self.selection) if self.selection is not None else ctx.valid

    def _call(self, ctx: Context, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, ctx) if self._with_ctx else self.fn(x)
        if out is None:
            return x
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise InterventionError(f"fn at {self.site!r} must return a tensor of shape {tuple(x.shape)} (or None); got {got}")
        return out.to(x.dtype)

    def edit_embeds(self, ctx: Context, embeds: torch.Tensor) -> torch.Tensor:
        if self._at != -1:
            return embeds
        new = self._call(ctx, embeds.clone())
        return torch.where(self._mask[..., None], new, embeds)

    def after_layer(self, ctx: Context, layer: int, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        if self._at != layer:
            return hidden
        # the packed rows at their batch positions, for a function that thinks in positions (absent: zero)
        full = rows.scatter(torch.zeros(*ctx.roles.kind.shape, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device), hidden)
        new = rows.gather(self._call(ctx, full))
        keep = rows.valid & rows.gather(self._mask)
        return torch.where(keep[..., None], new, hidden)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"Hook({name}, site={self.site!r}, tokens={self.tokens!r})"


def _required_positional(fn: Callable) -> int:
    """How many positional parameters `fn` requires (a function of ``(x, ctx)`` gets both)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: one argument
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)
