"""Semantic linear probe: do visual tokens linearly encode what is under their patch?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedlens.errors import InputError, PlanError
from embedlens.probes._util import Reservoir, parse_site, token_groups, visual_rows
from embedlens.probes.base import Probe, Table
from embedlens.registry import probes
from embedlens.sites import Site

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch


def patch_label(grid: list[list[Any]], row: int, col: int, n_rows: int, n_cols: int) -> Any:
    """The annotation under patch (row, col) of an ``n_rows x n_cols`` token grid, read from a grid of any size.

    The patch centre is mapped to the annotation grid, so a grid at the
    encoder's patch resolution is read cell for cell and a coarser or finer
    one is resampled (nearest).
    """
    gr, gc = len(grid), len(grid[0])
    return grid[min(gr - 1, int((row + 0.5) * gr / n_rows))][min(gc - 1, int((col + 0.5) * gc / n_cols))]


def sample_grid(sample, attribute: str, image: int) -> list[list[Any]] | None:
    """The annotation grid of one attribute for one image of a sample, or None when not annotated.

    Format: ``sample.meta["patch_labels"][attribute]`` is a 2-D list (rows of
    labels; ``null`` = not labelled) for a single-image sample, or a list of
    such grids, one per image.
    """
    labels = (sample.meta or {}).get("patch_labels", {})
    if attribute not in labels:
        return None
    g = labels[attribute]
    if not isinstance(g, list) or not g or not isinstance(g[0], list):
        raise InputError(f"sample {sample.id!r}: meta.patch_labels.{attribute} must be a grid (list of rows) or a list of grids")
    if g and g[0] and isinstance(g[0][0], list):  # one grid per image
        if image >= len(g):
            return None
        g = g[image]
    if any(len(r) != len(g[0]) for r in g):
        raise InputError(f"sample {sample.id!r}: meta.patch_labels.{attribute} rows have different lengths")
    return g


@probes.register("semantic_probe")
class SemanticProbe(Probe):
    """Cross-validated logistic regression predicting per-patch attributes from visual tokens, per site and group.

    The data set annotates what lies under each patch (colour, object class,
    character, ...) as grids in ``meta.patch_labels`` (see `sample_grid`);
    tokens of the base tile (tile 0) are labelled by the cell under their
    patch centre. For every site, attribute and group of the run's partition
    (and ``all``), a scikit-learn `LogisticRegression` is scored with
    stratified k-fold cross-validation on a seeded reservoir of tokens, next
    to the majority-class rate (chance). This is the "alive tokens already
    encode objects, colours, OCR" experiment.

    Args:
        attributes: annotation names to predict.
        sites: where tokens are read, e.g. ``[llm.embed, llm.layers[3]]``; ``llm.layers[i].experts``
            (mixture-of-experts families) reads each token's routing, multi-hot over the experts.
        cv: folds (fewer when a class is rarer).
        C: inverse regularisation strength.
        max_tokens: reservoir size per site.
        seed: seed of the reservoir, the folds and the solver.
        standardize: scale every feature to unit variance first (a `StandardScaler`
            fitted inside each training fold). Without it the L2 penalty hides a
            signal carried at a small scale (tokens pulled tightly onto one
            point); with it such a signal is read at full strength.

    Example:
        >>> from embedlens.adapters import load_model
        >>> from embedlens.testing.planted import planted_samples
        >>> from embedlens.tracing import collect
        >>> adapter = load_model("tiny:llava-clip")
        >>> batch = adapter.encode(planted_samples(10))  # 4x4 colour grids in meta.patch_labels
        >>> probe = SemanticProbe(attributes=["colour"], cv=2)
        >>> _ = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        >>> probe.result()["n_labelled_tokens"], probe.result()["scores"][0]["group"]
        (160, 'all')
    """

    example_params = {"attributes": ["colour"], "cv": 2}

    def __init__(
        self,
        attributes: list[str],
        sites: list[str] = ["llm.embed"],  # noqa: B006 - never mutated
        cv: int = 5,
        C: float = 1.0,
        max_tokens: int = 5000,
        seed: int = 0,
        standardize: bool = False,
    ):
        if not attributes:
            raise PlanError("semantic_probe.attributes: name at least one annotated attribute, e.g. [colour]")
        if not sites:
            raise PlanError("semantic_probe.sites: name at least one site")
        if cv < 2:
            raise PlanError(f"semantic_probe.cv: must be >= 2; got {cv}")
        self.attributes, self.site_names, self.cv, self.C, self.max_tokens, self.seed = list(attributes), list(sites), cv, C, max_tokens, seed
        self.standardize = bool(standardize)
        self._res: dict[str, Reservoir] = {}
        self._labelled = 0

    def sites(self, adapter: "Adapter") -> list[Site]:
        return [parse_site("semantic_probe", "sites", adapter, s) for s in self.site_names]

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch

        vt = batch.roles.visual_tokens()
        labels: dict[str, list[Any]] = {a: [] for a in self.attributes}
        keep = []
        for i in range(len(vt["sample"])):
            s, img, tile = int(vt["sample"][i]), int(vt["image"][i]), int(vt["tile"][i])
            if tile != 0:
                continue
            n_rows, n_cols = batch.roles.grid_shape(s, img, 0)
            row = {a: None for a in self.attributes}
            for a in self.attributes:
                g = sample_grid(batch.samples[s], a, img)
                if g is not None:
                    row[a] = patch_label(g, int(vt["row"][i]), int(vt["col"][i]), n_rows, n_cols)
            if any(v is not None for v in row.values()):
                keep.append(i)
                for a in self.attributes:
                    labels[a].append(row[a])
        if not keep:
            return {}
        idx = torch.tensor(keep)
        sub = {k: v[idx] for k, v in vt.items()}
        groups = token_groups(batch, sub["sample"], sub["position"])
        for site, name in zip(self.sites(adapter), self.site_names):
            x = visual_rows(adapter, site, acts[site], sub, batch.inputs).float().cpu()
            self._res.setdefault(name, Reservoir(self.max_tokens, self.seed)).add(x, group=groups, **labels)
        self._labelled += len(keep)
        return {}

    def scores(self) -> list[dict[str, Any]]:
        """One entry per site, attribute and group: cross-validated accuracy, chance, n."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        out = []
        for name in self.site_names:
            res = self._res.get(name)
            if res is None or len(res) == 0:
                continue
            x = res.rows().double().numpy()
            groups = res.labels["group"]
            for a in self.attributes:
                y_all = res.labels[a]
                for g in ["all", *sorted(set(groups))]:
                    idx = [i for i, (yy, gg) in enumerate(zip(y_all, groups)) if yy is not None and (g == "all" or gg == g)]
                    entry = {"site": name, "attribute": a, "group": g, "n": len(idx), "accuracy": None, "chance": None, "folds": 0,
                             "standardized": self.standardize}
                    if idx:
                        y = [str(y_all[i]) for i in idx]
                        counts = {c: y.count(c) for c in set(y)}
                        entry["chance"] = max(counts.values()) / len(y)
                        folds = min(self.cv, min(counts.values()))
                        if len(counts) >= 2 and folds >= 2:
                            clf = LogisticRegression(C=self.C, max_iter=2000, random_state=self.seed)
                            if self.standardize:
                                clf = make_pipeline(StandardScaler(), clf)
                            cvs = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
                            entry["accuracy"] = float(cross_val_score(clf, x[idx], y, cv=cvs).mean())
                            entry["folds"] = folds
                    out.append(entry)
        return out

    def result(self) -> dict[str, Any]:
        return {"n_labelled_tokens": self._labelled, "scores": self.scores() if self._res else []}

    def final_tables(self) -> dict[str, Table]:
        sc = self.scores() if self._res else []
        if not sc:
            return {}
        return {"scores": {k: [e[k] for e in sc] for k in sc[0]}}

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import layer_curves

        sc = self.scores() if self._res else []
        out = []
        for a in self.attributes:
            curves: dict[str, tuple[list, list]] = {}
            for e in sc:
                if e["attribute"] == a and e["accuracy"] is not None:
                    xs, ys = curves.setdefault(e["group"], ([], []))
                    xs.append(self.site_names.index(e["site"]))
                    ys.append(e["accuracy"])
            if curves:
                out.append(layer_curves(curves, Path(out_dir) / f"semantic_probe_{a}.png", xlabel="site probed",
                    xticklabels=dict(enumerate(self.site_names)), ylabel=f"cross-validated accuracy\npredicting '{a}' from the group's tokens",
                    legend_title="token group",
                    title=f"Linear probe for '{a}' per site and token group"))
        return out
