"""A model as `embedlens validate` sees it without loading weights: its ``config.json``, read as JSON.

`embedlens validate` checks a plan's layer ranges, sites, vocabulary ids and
control pools against the model's architecture in about a second: it reads
the checkpoint's ``config.json`` (no transformers or torch import, no weights) and
gives the plugins' own ``check`` methods a `ConfigAdapter`, which answers
what a config determines (layer counts, vocabulary and hidden size, a fixed
patch grid) and raises `NeedsModel` for anything else (the tokenizer, the
processor, a module). What a check could not see is listed by validate, and
``validate --deep`` (which loads the model) checks it. ``tiny:`` models are built in code: their configs are stored (`embedlens.plan.tiny_configs`) and read the same
way. Plugin sources have no config file: validate loads them, as ``--deep`` does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedlens.errors import AdapterError
from embedlens.sites import Site


class NeedsModel(Exception):
    """A check asked a `ConfigAdapter` for what only the loaded model has (not an `EmbedLensError`: no plan error)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


#: What a check asked for, as validate lists it.
_NEEDS = {"tokenizer": "the tokenizer (word and anchor ids)", "processor": "the processor", "model": "the model's modules",
          "prompt": "the processor's prompt format", "grid": "the processor's patch grid"}


def needs(e: NeedsModel) -> str:
    """What `e` asked for, in words: ``the tokenizer (word and anchor ids)``."""
    return _NEEDS.get(e.what, f"the loaded model ({e.what})")


def _int(d: dict | None, *keys: str) -> int | None:
    """The first of `keys` that `d` holds as an integer."""
    for k in keys:
        v = (d or {}).get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


#: Adapters whose every image is one fixed grid of visual tokens given by the vision config
#: (``image_size // patch_size`` square, row-major, nothing else in the image span but a kept CLS): their
#: control pools are computable before any image is processed. Other families tile or resize per image.
FIXED_GRID_ADAPTERS = ("llava",)


@dataclass(frozen=True)
class Architecture:
    """What a model's config says of the shapes the plan's checks need; None where it says nothing."""

    source: str
    adapter: str  # the registered adapter that would load it
    config: dict[str, Any]
    n_llm_layers: int | None
    n_vision_layers: int | None
    vocab_size: int | None
    hidden_size: int | None
    #: the adapter is forced (``model.adapter``) onto a checkpoint of an architecture it does not list: whether the
    #: weights fill its model class only loading can tell
    forced_elsewhere: bool = False

    @classmethod
    def from_config(cls, source: str, adapter: str, config: dict[str, Any]) -> "Architecture":
        """Read the counts from a config dict: the LLM's from ``text_config`` (or the top level, as older
        Qwen2-VL configs write it), the tower's layers from ``vision_config`` (``num_hidden_layers``, or ``depth``
        as Qwen-VL towers name it)."""
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else None
        return cls(source, adapter, config, _int(text, "num_hidden_layers"), _int(vision, "num_hidden_layers", "depth"),
                   _int(text, "vocab_size"), _int(text, "hidden_size"))

    @property
    def n_fields(self) -> tuple:
        return self.n_llm_layers, self.n_vision_layers, self.vocab_size, self.hidden_size

    def fixed_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of every image's visual tokens where that is fixed by the config (`FIXED_GRID_ADAPTERS`)."""
        if self.adapter not in FIXED_GRID_ADAPTERS:
            return None
        vision = self.config.get("vision_config") or {}
        size, patch = _int(vision, "image_size"), _int(vision, "patch_size")
        if not size or not patch:
            return None
        return size // patch, size // patch

    def kept_cls(self) -> bool:
        """LLaVA's "full" feature selection keeps a CLIP tower's CLS token in the image span."""
        vision = self.config.get("vision_config") or {}
        strategy = self.config.get("vision_feature_select_strategy") or "full"
        return strategy == "full" and str(vision.get("model_type", "")).startswith("clip")


class WeightShape:
    """A weight matrix as a config describes it: its ``shape``, and nothing else (no torch import, no values).

    Anything else a check reads of it (its values, its dtype) is what only the loaded model has: `NeedsModel`.

    Example:
        >>> w = WeightShape((10, 8), "input_embeddings")
        >>> w.shape[0], w.shape
        (10, (10, 8))
        >>> w[3]
        Traceback (most recent call last):
        ...
        embedlens.plan.architecture.NeedsModel: input_embeddings
    """

    def __init__(self, shape: tuple[int, ...], what: str):
        self.shape = shape
        self._what = what

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NeedsModel(self._what)

    def __getitem__(self, key):
        raise NeedsModel(self._what)


class ConfigAdapter:
    """The part of the `embedlens.adapters.base.Adapter` interface a config answers; everything else raises `NeedsModel`.

    Example:
        >>> arch = Architecture.from_config("x", "llava", {"text_config": {"num_hidden_layers": 4, "vocab_size": 10,
        ...     "hidden_size": 8}, "vision_config": {"num_hidden_layers": 3, "image_size": 32, "patch_size": 8}})
        >>> ad = ConfigAdapter(arch)
        >>> ad.n_llm_layers, ad.grid(), tuple(ad.input_embeddings().shape)
        (4, (4, 4), (10, 8))
        >>> ad.resolve("llm.layers[4]")
        Traceback (most recent call last):
        ...
        embedlens.errors.AdapterError: Site llm.layers[4]: layer 4 is out of range for this model (llm.layers has layers 0..3)
        >>> ad.tokenizer
        Traceback (most recent call last):
        ...
        embedlens.plan.architecture.NeedsModel: tokenizer
    """

    def __init__(self, arch: Architecture):
        self.arch = arch

    @property
    def name(self) -> str:
        return self.arch.adapter

    def _known(self, value: int | None, what: str) -> int:
        if value is None:
            raise NeedsModel(what)
        return value

    @property
    def n_llm_layers(self) -> int:
        return self._known(self.arch.n_llm_layers, "n_llm_layers")

    @property
    def n_vision_layers(self) -> int:
        return self._known(self.arch.n_vision_layers, "n_vision_layers")

    def n_layers(self, component: str) -> int:
        return self.n_vision_layers if component == "vision.layers" else self.n_llm_layers

    def resolve(self, site: "str | Site") -> Site:
        """As `Adapter.resolve`: parse a site and check its layer index against the config's layer count."""
        site = Site.parse(site)
        if site.layer is None:
            return site
        return site.resolve(self.n_layers(site.component))

    def input_embeddings(self, _extra: bool = True) -> "WeightShape":
        """`[vocab, d_model]`: the shape, no values (checks read its ``shape``). Molmo2's input table also holds
        its ``additional_vocab_size`` rows (its image tokens' embeddings), which its head does not."""
        text = self.arch.config.get("text_config") if isinstance(self.arch.config.get("text_config"), dict) else self.arch.config
        extra = (_int(text, "additional_vocab_size") or 0) if _extra else 0
        return WeightShape((self._known(self.arch.vocab_size, "input_embeddings") + extra,
                            self._known(self.arch.hidden_size, "input_embeddings")), "input_embeddings")

    def output_embeddings(self):
        """`[vocab, d_model]`: the head's rows (the shape, no values)."""
        return self.input_embeddings(_extra=False)

    def has(self, capability) -> bool:
        """As `Adapter.has`, from the built-in plugin index (a third-party adapter's capabilities need the model)."""
        from embedlens.plugin_index import read_index

        row = next((r for r in read_index().get("adapters", []) if r["name"] == self.name), None)
        if row is None or "capabilities" not in row:
            raise NeedsModel("capabilities")
        return getattr(capability, "value", capability) in row["capabilities"]

    def grid(self) -> tuple[int, int]:
        g = self.arch.fixed_grid()
        if g is None:
            raise NeedsModel("grid")
        return g

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NeedsModel(name)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > 16 << 20:
            raise AdapterError(f"cannot load a model config from {what}: {path} is larger than 16 MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot load a model config from {what} ({path}): {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"cannot load a model config from {what}: {path} is not a JSON object")
    return data


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, from its header alone (its size, and where its last tensor ends)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                return "its header length does not fit the file"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not a safetensors header"
    if 8 + n + max(ends, default=0) != size:
        return f"its tensors end at byte {8 + n + max(ends, default=0)} but the file has {size} (truncated or padded)"
    return None


def check_weight_files(folder: Path) -> None:
    """A model folder has its weights, whole, as far as file headers tell (no tensor is read): what loading would
    refuse first. safetensors files (single or sharded through their index) are checked from their headers.

    Raises:
        AdapterError: naming the folder and the file.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, repr(str(folder))).get("weight_map")
        shards = list(weight_map.values()) if isinstance(weight_map, dict) else [weight_map]
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")]
        if bad:  # a shard is a file of the folder: an index naming another path is not followed
            raise AdapterError(f"cannot load the model from {str(folder)!r}: its weight index names {bad[0]!r}, not a file of the folder")
        files = [folder / s for s in sorted(set(shards))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return  # loaded by torch, as transformers does; not read here
    else:
        raise AdapterError(f"cannot load the model from {str(folder)!r}: the folder has no weights "
                           "(model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    for f in files:
        if not f.is_file():
            raise AdapterError(f"cannot load the model from {str(folder)!r}: {f.name}, named by its weight index, is missing")
        problem = _safetensors_problem(f)
        if problem is not None:
            raise AdapterError(f"cannot load the model from {str(folder)!r}: {f.name} is not a whole safetensors file ({problem})")


def read_config(source: str, remote: bool = False) -> tuple[dict[str, Any], str] | None:
    """``config.json`` of a model source without loading the model, and where transformers would read it;
    for a ``tiny:`` model, its stored config; None for a source that has none (a plugin's, a tiny name not stored).

    Args:
        source: as `embedlens.plan.loader.LoadedPlan.model_source` resolves it (a local folder absolute).

    Raises:
        AdapterError, UnknownNameError: the config cannot be found or read (named).
    """
    from embedlens.adapters.sources import resolve
    from embedlens.registry import sources

    cls, name = resolve(source, remote)
    kind = next((n for n, c in sources.items() if c is cls), None)
    if kind == "zoo":
        from embedlens.zoo import zoo_path

        try:
            folder = zoo_path(name)
        except FileNotFoundError as e:
            raise AdapterError(str(e)) from None
        return _read_json(folder / "config.json", f"zoo:{name}"), str(folder)
    if kind == "tiny":  # built in code: its config as stored (`embedlens.plan.tiny_configs`), no model built
        from embedlens.plan.tiny_configs import stored_config

        config = stored_config(name)
        return None if config is None else (config, f"tiny:{name}")
    if kind not in ("hub", "remote"):
        return None
    folder = Path(name)
    if folder.is_dir():
        from embedlens.adapters._remote_code import refuse_remote_code

        refuse_remote_code(folder)  # as loading does: a folder that brings code is refused before anything of it is read
        if not (folder / "config.json").is_file():
            raise AdapterError(f"cannot load a model config from {name!r}: the folder has no config.json")
        return _read_json(folder / "config.json", repr(name)), name
    from huggingface_hub import hf_hub_download

    try:  # the config file only: from the cache, or downloaded (a few kB) where the hub is reachable
        path = hf_hub_download(name, "config.json")
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo, bad id: all the same remedy
        raise AdapterError(f"cannot load a model config from {name!r}: {type(e).__name__}: {str(e)[:300]}") from None
    return _read_json(Path(path), repr(name)), name


def _with_defaults(where: str) -> dict[str, Any]:
    """The config as transformers builds it, every default filled in: ``save_pretrained`` leaves out the values
    equal to the config class's defaults (a LLaVA-1.5 config.json has no ``text_config.num_hidden_layers``)."""
    from transformers import AutoConfig

    from embedlens.adapters._remote_code import NO_REMOTE_CODE

    try:
        return AutoConfig.from_pretrained(where, **NO_REMOTE_CODE).to_dict()
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a config it cannot read
        raise AdapterError(f"cannot load a model config from {where!r}: {type(e).__name__}: {str(e)[:300]}") from None


def adapter_name(config: dict[str, Any], forced: str | None, missing_ok: bool = False) -> str | None:
    """The adapter that would load a model of this config: `forced`, else the one whose architectures match.

    Built-in adapters are matched from the stored plugin index (no import); a config none of them takes
    is matched against every registered adapter, third-party ones included, which raises the loader's
    own error when none fits.

    Args:
        missing_ok: None, instead of the loader's error, where no adapter takes the architecture.

    Raises:
        UnknownNameError: `forced` is no adapter. AdapterError: no adapter takes the architecture.
    """
    from embedlens.plugin_index import read_index

    index = read_index().get("adapters", [])
    if forced is not None:
        if any(row["name"] == forced for row in index):
            return forced
        from embedlens.registry import adapters

        return adapters.get(forced).registered_name
    archs = config.get("architectures") or ()
    archs = set(archs) if isinstance(archs, list) else set()
    tower = (config.get("vision_config") or {}).get("model_type") if isinstance(config.get("vision_config"), dict) else None
    for row in index:
        # as `Adapter.mismatch`: where adapters share an architecture (LLaVA with a CLIP/SigLIP tower, or Pixtral's),
        # the one whose declared towers hold the config's
        if archs & set(row.get("architectures", ())) and (not row.get("vision_towers") or tower in row["vision_towers"]):
            return row["name"]
    unfit = [row for row in index if archs & set(row.get("architectures", ()))]
    if unfit:  # built-in adapters take the architecture, but none this tower: the loader's refusal, with the reasons
        from embedlens.adapters._unsupported import unsupported

        if missing_ok:
            return None
        raise unsupported(", ".join(sorted(archs)), [
            f"its vision tower is {tower!r}; adapter {row['name']!r} takes {' or '.join(map(repr, row['vision_towers']))}"
            for row in unfit])
    from embedlens.adapters import adapter_for_architecture

    try:
        return adapter_for_architecture(sorted(archs), str(config.get("model_type", ""))).registered_name
    except AdapterError:
        if missing_ok:
            return None
        raise


def architecture(source: str, forced_adapter: str | None = None, remote: bool = False) -> Architecture | None:
    """The `Architecture` of a model source from its config alone; None where the source has no config to read.

    The file is read as JSON (no transformers import); where it leaves out a count the checks need (a value
    equal to its class default), transformers reads the config again with its defaults: still no weights.

    Raises:
        EmbedLensError: the config cannot be read, or no adapter takes it.
    """
    found = read_config(source, remote)
    if found is None:
        return None
    config, where = found
    arch = Architecture.from_config(source, adapter_name(config, forced_adapter), config)
    if where.startswith("tiny:"):  # a stored config is whole (every default written): nothing to read again
        if forced_adapter is not None and adapter_name(config, None, missing_ok=True) != forced_adapter:
            arch = dataclasses.replace(arch, forced_elsewhere=True)
        return arch
    if Path(where).is_dir():  # as loading does: the architecture's adapter first, then the weights
        check_weight_files(Path(where))
    if None in arch.n_fields or (
            arch.adapter in FIXED_GRID_ADAPTERS and (arch.fixed_grid() is None or "vision_feature_select_strategy" not in config)):
        arch = Architecture.from_config(source, arch.adapter, _with_defaults(where))
    if forced_adapter is not None and adapter_name(config, None, missing_ok=True) != forced_adapter:
        arch = dataclasses.replace(arch, forced_elsewhere=True)
    return arch
