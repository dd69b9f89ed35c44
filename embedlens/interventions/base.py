"""Base class of interventions: edits of the LLM's prefill, applied by the
`Engine` (`embedlens.interventions.engine`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

from embedlens.errors import InterventionError
from embedlens.interventions.select import Selection, SelectionSpec
from embedlens.state import Stateful

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.interventions.context import Context, Rows
    from embedlens.sites import Site

IfEmpty = Literal["error", "noop"]


class Intervention(Stateful, ABC):
    """An edit of the forward pass at prefill (pruning, knockout, injection, ...).

    Subclasses take explicit, typed constructor parameters and register with
    ``@interventions.register("name")``. The engine calls, in order:

    - `check(adapter)` once, before the first batch: parameters vs the model;
    - `setup(ctx)` per batch: resolve selections, set ``ctx.enter``/``ctx.exit``
      (which layers each token is present in), request attention rows;
    - `edit_embeds` on the LLM input; then per layer `before_layer`,
      `zero_update` / `blocked` (masks over batch positions), `after_layer`.

    Every hook but `setup` defaults to "no change". Interventions that need a
    statistic of the data set (`needs_fit`) get `fit_sites` read over the data
    in an earlier pass, through `observe` and `finish_fit`. Checkpoints save
    `state_dict()` (by default the attributes, as plain data; see
    `embedlens.state`) and load it into an intervention built from the plan.
    """

    registered_name: ClassVar[str] = ""
    needs_fit: ClassVar[bool] = False
    #: True for a random draw of as many tokens as a budget (``keep``) allows: the control every method with
    #: the same ``keep`` is compared with (`embedlens.plan.effects.matched_controls`).
    budget_control: ClassVar[bool] = False

    def check(self, adapter: "Adapter") -> None:
        """Validate parameters against the loaded model; raise `InterventionError` naming the value."""

    @abstractmethod
    def setup(self, ctx: "Context") -> None:
        """Prepare for one batch (resolve selections, set enter/exit)."""

    def edit_embeds(self, ctx: "Context", embeds: torch.Tensor) -> torch.Tensor:
        return embeds

    def before_layer(self, ctx: "Context", layer: int) -> None:
        """Change ``ctx.enter``/``ctx.exit`` just before `layer` runs (e.g. FastV)."""

    def zero_update(self, ctx: "Context", layer: int, sublayer: str) -> torch.Tensor | None:
        """`[batch, seq]` tokens whose `sublayer` ("attn" or "mlp") update is zeroed in `layer`."""
        return None

    def blocked(self, ctx: "Context", layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(src, dst)` `[batch, seq]` masks: queries in src may not attend to keys in dst in `layer`."""
        return None

    def after_layer(self, ctx: "Context", layer: int, hidden: torch.Tensor, rows: "Rows") -> torch.Tensor:
        return hidden

    # -- data-set statistics -----------------------------------------------------
    def fit_sites(self, adapter: "Adapter") -> list["Site"]:
        return []

    def observe(self, adapter: "Adapter", batch: "Batch", acts: dict) -> None:
        """Accumulate a statistic from one batch's activations at `fit_sites`."""

    def finish_fit(self) -> None:
        """Turn the accumulated statistic into what `setup` uses."""

    def __repr__(self) -> str:
        from embedlens.registry import plugin_params

        args = ", ".join(f"{p.name}={getattr(self, p.name, p.default)!r}" for p in plugin_params(type(self)))
        return f"{type(self).__name__}({args})"


def parse_selection(value: SelectionSpec, param: str) -> Selection:
    """Parse a selection parameter, naming the parameter in errors."""
    try:
        return Selection.parse(value)
    except InterventionError as exc:
        raise InterventionError(f"{param}: {exc}") from None


def check_layer(value: int, n_layers: int, param: str, *, allow_end: bool = False) -> int:
    """Check a decoder-layer index (negative counts from the end)."""
    hi = n_layers if allow_end else n_layers - 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise InterventionError(f"{param}: layer must be an integer; got {value!r}")
    v = value + n_layers if value < 0 else value
    if not 0 <= v <= hi:
        raise InterventionError(f"{param}: layer {value} is out of range for this model (0..{hi})")
    return v


def require_nonempty(ctx: "Context", mask: torch.Tensor, param: str, spec, if_empty: IfEmpty, what: str = "visual") -> torch.Tensor:
    """Per-sample check that a selection picked something; `[batch]` bool of samples that did.

    Raises:
        InterventionError: naming the parameter, the selection and the samples,
            when some sample's selection is empty and `if_empty` is "error".
    """
    has = mask.any(dim=1)
    if if_empty == "error" and not bool(has.all()):
        raise InterventionError(
            f"{param}: selection {str(Selection.parse(spec))!r} matches no {what + ' ' if what else ''}token in sample(s) "
            f"{ctx.sample_ids(~has)}; pick another selection, or set if_empty: noop to leave such samples unchanged"
        )
    return has
