"""The model zoo: small LLaVA models trained by embedlens on its synthetic data set, shipped in the package.

No pretrained multimodal weights can be assumed offline, so embedlens trains
its own (`embedlens zoo train`, see `embedlens.zoo.train` for the recipe)
and ships them; load them by name anywhere a model is named:

    >>> from embedlens.adapters import load_model
    >>> adapter = load_model("zoo:tiny-llava-clip")
    >>> adapter.tower, adapter.n_llm_layers
    ('clip', 4)

Names:
    tiny-llava-clip: CLIP-tower LLaVA (softmax contrastive tower pretraining).
    tiny-llava-siglip: SigLIP-tower LLaVA (sigmoid loss).
    tiny-llava-clip-planted: tiny-llava-clip with PLANTED sinks (one
        high-norm vision token and a massive LLM activation, edited into the
        weights by `embedlens.zoo.planted`), for exercising the sink detectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedlens.errors import UnknownNameError

ZOO_PREFIX = "zoo:"
ZOO_DIR = Path(__file__).resolve().parent.parent / "resources" / "zoo"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    folder: str  # checkpoint folder under resources/zoo
    description: str
    planted: bool = False


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("tiny-llava-clip", "tiny-llava-clip", "CLIP-tower LLaVA trained on the synthetic shapes set"),
        ZooEntry("tiny-llava-siglip", "tiny-llava-siglip", "SigLIP-tower LLaVA trained on the synthetic shapes set"),
        ZooEntry("tiny-llava-clip-planted", "tiny-llava-clip",
                 "tiny-llava-clip with PLANTED sinks: one high-norm vision token and a massive LLM activation", planted=True),
    )
}


def zoo_path(name: str) -> Path:
    """The checkpoint folder of a zoo model (for the planted variant: the folder it is edited from)."""
    if name not in ZOO:
        raise UnknownNameError.make("zoo model", name, ZOO)
    path = ZOO_DIR / ZOO[name].folder
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"zoo model {name!r}: no checkpoint at {path}; is the package installed with its resources?")
    return path


def load_zoo(
    name: str,
    adapter: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    placement=None,
):
    """Load a zoo model through the normal adapter path; the planted variant gets its sinks planted.

    Args:
        name: a `ZOO` name.
        adapter: force an adapter (as `load_model`'s `adapter`): checked like any
            other source, so a wrong one is an error, not ignored.

    Raises:
        UnknownNameError: an unknown zoo model or adapter name.
        AdapterError: the forced adapter does not fit the checkpoint.
    """
    from embedlens.adapters import load_model

    path = str(zoo_path(name))
    adapter = load_model(path, adapter=adapter, dtype=dtype, device=device, attn_implementation=attn_implementation, placement=placement)
    if ZOO[name].planted:
        from embedlens.zoo.planted import plant_sinks

        plant_sinks(adapter.model)
    adapter.source = ZOO_PREFIX + name
    return adapter


__all__ = ["ZOO", "ZOO_PREFIX", "ZooEntry", "load_zoo", "zoo_path"]
