"""The one vocabulary of sites every adapter maps onto its model.

A site names an activation independently of the model family:

=========================  ===================================================
``vision.embed``           patch-embedding output of the vision tower
``vision.layers[i]``       residual stream after vision layer ``i``
``vision.features``        what the projector receives (feature layer, CLS rule)
``projector``              projector output: the visual tokens
``llm.embed``              merged input embeddings given to the language model
``llm.layers[i].in``       residual stream entering LLM layer ``i``
``llm.layers[i]``          residual stream leaving LLM layer ``i`` (before the final norm)
``llm.layers[i].attn``     attention update of layer ``i`` (before the residual add)
``llm.layers[i].mlp``      MLP update of layer ``i`` (before the residual add)
``llm.layers[i].experts``  the experts each token is routed to in layer ``i``, ``[batch, seq, top_k]``
                           ids (mixture-of-experts layers: Gemma 4's, Qwen3-VL-MoE's,
                           GLM-4.5V's and Llama 4's sparse ones, `Adapter.expert_layers`)
``llm.norm``               final norm output
``llm.unembed``            logits as the model returns them (``outputs.logits``;
                           ``lm_head`` then final-logit softcapping, Gemma2)
=========================  ===================================================

Against Hugging Face's ``output_hidden_states`` (``n`` decoder layers):
``hidden_states[i]`` is ``llm.layers[i].in`` for ``i < n`` (``hidden_states[0]``
is ``llm.embed``) and ``llm.layers[i - 1]`` for ``0 < i < n``, but
``hidden_states[n]`` (``hidden_states[-1]``) is ``llm.norm``, after the final
norm, while ``llm.layers[n - 1]`` is before it. The lenses number layers from
the LLM input (lens layer ``l`` = ``llm.layers[l - 1]``); per-layer keys of
``sink_detector`` are decoder layers (``llm.layers[l]``).

A packed tower (Qwen-VL, Pixtral: the batch's patches as one sequence, `Capability.PACKED_TOWER`)
gives its vision sites as ``[1, patches, d]`` (``projector``: ``[1, tokens, d]``);
see `embedlens.adapters.qwen2_vl` and `embedlens.adapters.mistral3` for the order of their rows.

``vision.features`` is indexed by a visual token's ``feature_col``;
``vision.layers[i]`` by ``feature_col`` + `Adapter.n_prefix_tokens` (the
tokens the family drops before the projector: CLIP's CLS under
``vision_feature_select_strategy: default``).

Example:
    >>> Site.parse("llm.layers[3].mlp")
    Site(component='llm.layers', layer=3, sub='mlp')
    >>> str(Site.parse("vision.layers[-2]"))
    'vision.layers[-2]'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from embedlens.errors import AdapterError, UnknownNameError
from embedlens.state import value_type

# Components in the order a forward pass reaches them; nnsight requires sites
# to be touched in that order inside one trace.
COMPONENTS = (
    "vision.embed",
    "vision.layers",
    "vision.features",
    "projector",
    "llm.embed",
    "llm.layers",
    "llm.norm",
    "llm.unembed",
)
LAYERED = {"vision.layers", "llm.layers"}
LLM_SUBS = ("in", "attn", "experts", "mlp", None)  # execution order inside a decoder layer (the router runs before the MLP update is complete)

_PATTERN = re.compile(r"^(?P<comp>[a-z.]+?)(?:\[(?P<layer>-?\d+)\])?(?:\.(?P<sub>in|attn|experts|mlp))?$")


@value_type
@dataclass(frozen=True)
class Site:
    """A parsed site name; `layer` may be negative until resolved by an adapter."""

    component: str
    layer: int | None = None
    sub: str | None = None

    @classmethod
    def parse(cls, name: "str | Site") -> "Site":
        """Parse a site name such as ``llm.layers[3].attn``.

        Raises:
            UnknownNameError: the component does not exist (with suggestions).
            AdapterError: a layer index is missing, or given where none is taken.
        """
        if isinstance(name, Site):
            return name
        m = _PATTERN.match(name.strip())
        comp = m.group("comp") if m else name
        if comp not in COMPONENTS:
            raise UnknownNameError.make("site", name, [*COMPONENTS[:1], "vision.layers[i]", *COMPONENTS[2:5],
                                                         "llm.layers[i]", "llm.layers[i].in", "llm.layers[i].attn",
                                                         "llm.layers[i].mlp", "llm.layers[i].experts", *COMPONENTS[6:]])
        layer = int(m.group("layer")) if m.group("layer") is not None else None
        sub = m.group("sub")
        if comp in LAYERED and layer is None:
            raise AdapterError(f"Site {name!r} needs a layer index, e.g. {comp}[0]")
        if comp not in LAYERED and layer is not None:
            raise AdapterError(f"Site {name!r}: {comp} takes no layer index")
        if sub is not None and comp != "llm.layers":
            raise AdapterError(f"Site {name!r}: only llm.layers[i] has .in/.attn/.mlp/.experts")
        return cls(comp, layer, sub)

    def __str__(self) -> str:
        s = self.component
        if self.layer is not None:
            s += f"[{self.layer}]"
        if self.sub is not None:
            s += f".{self.sub}"
        return s

    def order_key(self) -> tuple[int, int, int]:
        """Sort key giving forward-pass order (layers must be resolved first)."""
        return (COMPONENTS.index(self.component), self.layer or 0, LLM_SUBS.index(self.sub))

    def resolve(self, n_layers: int) -> "Site":
        """Return the site with a non-negative layer index checked against `n_layers`.

        Raises:
            AdapterError: if the layer is out of range.
        """
        if self.layer is None:
            return self
        idx = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= idx < n_layers:
            raise AdapterError(
                f"Site {self}: layer {self.layer} is out of range for this model "
                f"({self.component} has layers 0..{n_layers - 1})"
            )
        return Site(self.component, idx, self.sub)
