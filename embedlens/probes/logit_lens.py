"""Logit lens and tuned lens: read the residual stream at every LLM layer through the unembedding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from embedlens._torch import no_grad
from embedlens.adapters.base import resolve_path
from embedlens.errors import PlanError
from embedlens.probes._util import parse_selections, resolve_layers, selection_masks, token_groups
from embedlens.probes.base import Probe, Table
from embedlens.probes.embedding_lens import lens_site
from embedlens.registry import probes
from embedlens.sites import Site
from embedlens.vocab import vocab_strings

if TYPE_CHECKING:
    from embedlens.adapters.base import Adapter, Batch
    from embedlens.probes.translators import Translators


def lens_logits(adapter: "Adapter", h: torch.Tensor) -> torch.Tensor:
    """``W_U . FinalNorm(h)``: logits read from residual states ``[..., d]`` (float32).

    With the model's final-logit softcapping applied (Gemma2), as in `llm.unembed`:
    at the last layer these are the model's own logits.
    """
    norm = resolve_path(adapter.model, adapter.paths.llm_norm)
    head = resolve_path(adapter.model, adapter.paths.unembed)
    return adapter.softcap_logits(head(norm(h.to(adapter.device, next(head.parameters()).dtype))).float())


def _select(probe: str, sels: dict, batch: "Batch") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(selection name, samples, positions) for each selection, padding excluded."""
    return [(q, *m.nonzero(as_tuple=True)) for q, m in selection_masks(probe, "roles", sels, batch).items()]


def _target_ids(adapter: "Adapter", batch: "Batch", target: str | None) -> list[int | None]:
    """Per sample, the token whose rank is tracked: the answer's first token, or a fixed word's first token."""
    if target is None:
        return [None] * len(batch.samples)
    if target == "answer":
        return [adapter.continuation_ids(s, s.answer)[0] if s.answer else None for s in batch.samples]
    ids = adapter.tokenizer(target, add_special_tokens=False)["input_ids"]
    return [ids[0] if ids else None] * len(batch.samples)


@probes.register("logit_lens")
class LogitLens(Probe):
    """Final norm + unembedding applied at every LLM layer, for chosen tokens.

    Per token and layer: the top-k tokens and probabilities, the entropy of
    the distribution, and the rank (0 = top) and probability of a target
    token (the sample's answer's first token, or a fixed word). Summaries are
    per selection (and per group for visual tokens) and layer; layer l is the
    residual stream after decoder layer l - 1 (0 = the LLM input), read before
    the final norm, which the lens applies itself: at l = n_layers the lens
    gives the model's own logits (final-logit softcapping included, as
    `llm.unembed`).

    Args:
        layers: lens layers (default: all, 0..n).
        roles: token selections to read (role names or selection expressions).
        k: top tokens kept per row.
        target: "answer", a word, or None.
        token_chunk: rows unembedded at once (bounds the ``[rows, vocab]`` logits).

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=2)
        >>> probe = LogitLens(roles=["last"], k=2)
        >>> rows = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))["tokens"]
        >>> len(rows["layer"]) == 2 * (adapter.n_llm_layers + 1)
        True
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        roles: list[str] = ["visual", "last"],  # noqa: B006 - never mutated
        k: int = 5,
        target: str | None = "answer",
        token_chunk: int = 256,
    ):
        if k < 1:
            raise PlanError(f"logit_lens.k: must be >= 1; got {k}")
        self._sels = parse_selections(self.registered_name, "roles", roles)
        self.layers, self.roles, self.k, self.target, self.token_chunk = layers, list(roles), k, target, token_chunk
        self._stats: dict[tuple[str, int], list[float]] = {}  # (role/group, layer) -> [n, sum entropy, sum rank, n ranked, top1 agrees final]
        self._current: int | None = None  # layer being read (the tuned lens picks its translator by it)

    reads_final: ClassVar[bool] = True  # default layers include n (the final read-out itself)

    def _layers(self, adapter: "Adapter") -> list[int]:
        n = adapter.n_llm_layers
        if self.layers is None:
            return list(range(n + 1 if self.reads_final else n))
        return resolve_layers(self.registered_name, "layers", self.layers, n)

    def sites(self, adapter: "Adapter") -> list[Site]:
        layers = sorted(set(self._layers(adapter)) | {adapter.n_llm_layers})
        return [lens_site(layer) for layer in layers]

    def _read(self, adapter: "Adapter", h: torch.Tensor) -> torch.Tensor:
        return lens_logits(adapter, h)

    @no_grad
    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        return self._tables(adapter, batch, acts)

    @no_grad
    def _tables(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch

        cols = ["sample", "sample_id", "position", "role", "group", "layer"]
        cols += [f"{x}_{j}" for j in range(1, self.k + 1) for x in ("id", "token", "prob")]
        cols += ["entropy", "target_id", "target_rank", "target_prob"]
        rows: Table = {c: [] for c in cols}
        targets = _target_ids(adapter, batch, self.target)
        n = adapter.n_llm_layers
        name = self.registered_name
        for role, s, p in _select(name, self._sels, batch):
            if len(s) == 0:
                continue
            groups = token_groups(batch, s, p) if role == "visual" else [role] * len(s)
            tgt = torch.tensor([t if t is not None else -1 for t in targets])[s]
            chunks = [slice(i, i + self.token_chunk) for i in range(0, len(s), self.token_chunk)]
            index: dict = {}  # device -> (samples, positions), moved once per selection

            def rows_at(h: torch.Tensor, c: slice) -> torch.Tensor:
                if h.device not in index:
                    index[h.device] = (s.to(h.device), p.to(h.device))
                si, pi = index[h.device]
                return h[si[c], pi[c]]

            final = [lens_logits(adapter, rows_at(acts[lens_site(n)], c)) for c in chunks]
            names = vocab_strings(adapter.tokenizer, final[0].shape[-1])  # [vocab] id -> token string, built once
            final_top = torch.cat([f.argmax(-1) for f in final])
            del final
            tgt_d = tgt.to(final_top.device)
            layers = self._layers(adapter)
            per_layer = []
            for layer in layers:  # summaries stay on the device: no copy per layer or chunk
                self._current = layer
                h = acts[lens_site(layer)]
                sums = [self._summarise(adapter, rows_at(h, c), tgt_d[c], final_top[c]) for c in chunks]
                per_layer.append([torch.cat([x[i] for x in sums]) for i in range(len(sums[0]))])
            # the results leave the device once per selection: [layers, rows, ...] each
            ent, top_p, top_i, t_p, rank, agree = (torch.stack([pl[i] for pl in per_layer]).cpu().numpy() for i in range(6))
            for li, layer in enumerate(layers):
                self._emit(rows, batch, role, groups, layer, s, p, tgt, names,
                           (ent[li], top_p[li], top_i[li], t_p[li], rank[li], agree[li]))
        return {"tokens": rows}

    def _summarise(self, adapter, h: torch.Tensor, tgt: torch.Tensor, final_top: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """On the device: entropy, top-k probabilities and ids, the target's probability and rank, and
        whether the top-1 is the final layer's, for `[rows, d]` states `h`."""
        import torch.nn.functional as F

        logp = F.log_softmax(self._read(adapter, h), dim=-1)  # [rows, vocab]
        probs = logp.exp()
        ent = -(probs * logp).sum(-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        t_lp = logp.gather(1, tgt.to(logp.device).clamp(min=0)[:, None])[:, 0]
        rank = (logp > t_lp[:, None]).sum(-1)
        return ent, top_p, top_i, t_lp.exp(), rank, top_i[:, 0] == final_top.to(top_i.device)

    def _emit(self, rows, batch, role, groups, layer, s, p, tgt, names, summary) -> None:
        ent, top_p, top_i, t_p, rank, agree = summary  # numpy, one row per token
        has = (tgt >= 0).numpy()
        n = len(s)
        rows["sample"] += s.tolist()
        rows["sample_id"] += [batch.samples[i].id for i in s.tolist()]
        rows["position"] += p.tolist()
        rows["role"] += [role] * n
        rows["group"] += list(groups)
        rows["layer"] += [layer] * n
        for j in range(self.k):
            rows[f"id_{j + 1}"] += top_i[:, j].tolist()
            rows[f"token_{j + 1}"] += names[top_i[:, j]].tolist()
            rows[f"prob_{j + 1}"] += top_p[:, j].tolist()
        rows["entropy"] += ent.tolist()
        rows["target_id"] += [int(t) if h else None for t, h in zip(tgt.tolist(), has.tolist())]
        rows["target_rank"] += [int(r) if h else None for r, h in zip(rank.tolist(), has.tolist())]
        rows["target_prob"] += [float(x) if h else None for x, h in zip(t_p.tolist(), has.tolist())]
        g_arr = np.asarray(list(groups), dtype=object)
        for g in dict.fromkeys(groups):  # per group, its tokens in order (sums as the token-by-token loop added them)
            at = g_arr == g
            st = self._stats.setdefault((g, layer), [0, 0.0, 0.0, 0, 0])
            st[0] += int(at.sum())
            st[1] = sum(ent[at].astype(np.float64).tolist(), st[1])
            st[2] = sum(rank[at & has].astype(np.float64).tolist(), st[2])
            st[3] += int((at & has).sum())
            st[4] += int(agree[at].sum())

    def result(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for (g, layer), (n, e, r, nr, agree) in sorted(self._stats.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            d = out.setdefault(g, {"layers": [], "mean_entropy": [], "mean_target_rank": [], "top1_agrees_with_final": []})
            d["layers"].append(layer)
            d["mean_entropy"].append(e / n)
            d["mean_target_rank"].append(r / nr if nr else None)
            d["top1_agrees_with_final"].append(agree / n)
        return {"by_role": out}

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import layer_curves

        res = self.result()["by_role"]
        if not res:
            return []
        name = self.registered_name
        out = [layer_curves({g: (d["layers"], d["mean_entropy"]) for g, d in res.items()}, Path(out_dir) / f"{name}_entropy.png",
                            xlabel="LLM layer (hidden state read)", ylabel="entropy of the read-out (nats),\nmean over the tokens",
                            legend_title="tokens", title=f"{name}: entropy of the read-out per layer")]
        ranked = {g: (d["layers"], [math.log1p(x) if x is not None else float("nan") for x in d["mean_target_rank"]])
                  for g, d in res.items() if any(x is not None for x in d["mean_target_rank"])}
        if ranked:
            out.append(layer_curves(ranked, Path(out_dir) / f"{name}_target_rank.png", xlabel="LLM layer (hidden state read)",
                                    ylabel="log(1 + mean rank of the target)\nover the tokens", legend_title="tokens",
                                    title=f"{name}: rank of the target token per layer"))
        return out


@probes.register("tuned_lens")
class TunedLens(LogitLens):
    """Tuned lens (2303.08112): a learned affine translator per layer before the final norm and unembedding.

    Translators start as the identity (the logit lens) and are fitted on the
    run's own batches to minimise KL(final distribution || lens distribution)
    over the selected tokens. Each batch is first evaluated, then trained on
    (prequential), so the reported KL is always on unseen data. Give
    `translators` to load fitted ones (they are then not trained);
    they are saved as ``tuned_lens.safetensors`` in the run folder.

    Args:
        layers: lens layers (default: 0..n-1; layer n is the final one).
        roles: token selections.
        k: top tokens kept per row.
        target: "answer", a word, or None.
        lr: Adam learning rate.
        steps: optimisation steps per batch.
        translators: a saved ``.safetensors`` file to load instead of training.
        seed: seed of the optimisation.
        token_chunk: rows unembedded at once.

    Example:
        >>> from embedlens.testing import tiny_batch
        >>> from embedlens.tracing import collect
        >>> adapter, batch = tiny_batch("llava-clip", n=2)
        >>> probe = TunedLens(layers=[1, 2], roles=["visual"], steps=2)
        >>> _ = probe.update(adapter, batch, collect(adapter, batch, probe.sites(adapter)))
        >>> sorted(probe.result()["kl"])
        ['1', '2']
    """

    def __init__(
        self,
        layers: list[int] | None = None,
        roles: list[str] = ["visual", "text"],  # noqa: B006 - never mutated
        k: int = 5,
        target: str | None = "answer",
        lr: float = 1e-3,
        steps: int = 20,
        translators: str | None = None,
        seed: int = 0,
        token_chunk: int = 256,
    ):
        super().__init__(layers=layers, roles=roles, k=k, target=target, token_chunk=token_chunk)
        if lr <= 0 or steps < 0:
            raise PlanError(f"tuned_lens: lr must be > 0 and steps >= 0; got lr={lr}, steps={steps}")
        self.lr, self.steps, self.translators, self.seed = lr, steps, translators, seed
        self._tr: Translators | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._layer_index: dict[int, int] = {}
        self._kl: dict[int, list[float]] = {}  # layer -> [sum KL logit lens, sum KL tuned, n]

    reads_final = False  # layer n is the target distribution, not a layer to translate

    def check(self, adapter: "Adapter") -> None:
        self.sites(adapter)
        self._init(adapter)

    def _load(self, adapter: "Adapter") -> None:
        """Read fitted translators: a safetensors file (never a pickle), its names, shapes and values checked before use."""
        import torch
        from safetensors import safe_open

        path = Path(self.translators)
        if not path.is_file():
            raise PlanError(f"tuned_lens.translators: file not found: {path}")
        want, d = self._layers(adapter), adapter.input_embeddings().shape[1]
        shapes = {"layers": [len(want)], "weight": [len(want), d, d], "bias": [len(want), d]}
        expected = f"expected the safetensors file a tuned_lens saves: layers {list(shapes['layers'])}, weight {shapes['weight']}, bias {shapes['bias']}"
        try:
            with safe_open(str(path), framework="pt") as f:
                got = {k: f.get_slice(k).get_shape() for k in f.keys()}
                if got != shapes:
                    raise PlanError(f"tuned_lens.translators: {path} holds {got or 'no tensors'}; {expected} (layers {want}, width {d})")
                state = {k: f.get_tensor(k) for k in shapes}
        except PlanError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a file that is not one
            raise PlanError(f"tuned_lens.translators: {path} is not a readable safetensors file ({type(e).__name__}: {e}); {expected}") from None
        layers = state.pop("layers")
        if layers.is_floating_point() or layers.tolist() != want:
            raise PlanError(f"tuned_lens.translators: {path} holds layers {layers.tolist()}; this probe reads layers {want}")
        for k, t in state.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise PlanError(f"tuned_lens.translators: {path}: {k} must hold finite floating-point values (dtype {t.dtype})")
        self._tr.load_state_dict({k: t.float() for k, t in state.items()})

    def _init(self, adapter: "Adapter") -> None:
        import torch

        from embedlens.probes.translators import Translators

        if self._tr is None:
            torch.manual_seed(self.seed)
            layers = self._layers(adapter)
            self._tr = Translators(layers, adapter.input_embeddings().shape[1])
            self._layer_index = {layer: i for i, layer in enumerate(layers)}
            self._opt = torch.optim.Adam(self._tr.parameters(), lr=self.lr)
            if self.translators is not None:
                self._load(adapter)

    def _read(self, adapter: "Adapter", h: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return lens_logits(adapter, self._tr(self._layer_index[self._current], h.float()))

    def update(self, adapter: "Adapter", batch: "Batch", acts: dict[Site, torch.Tensor]) -> dict[str, Table]:
        import torch
        import torch.nn.functional as F

        self._init(adapter)
        n = adapter.n_llm_layers
        sel = [(s, p) for _, s, p in _select(self.registered_name, self._sels, batch) if len(s)]
        if not sel:
            return {}
        s = torch.cat([x[0] for x in sel])
        p = torch.cat([x[1] for x in sel])
        with torch.no_grad():
            final = F.log_softmax(lens_logits(adapter, acts[lens_site(n)][s, p]), -1)
        # evaluate first (prequential), then train on this batch
        for layer in self._layers(adapter):
            self._current = layer
            h = acts[lens_site(layer)][s, p].float()
            with torch.no_grad():
                kl_logit = F.kl_div(F.log_softmax(lens_logits(adapter, h), -1), final, log_target=True, reduction="sum")
                kl_tuned = F.kl_div(F.log_softmax(self._read(adapter, h), -1), final, log_target=True, reduction="sum")
            acc = self._kl.setdefault(layer, [0.0, 0.0, 0])
            acc[0] += float(kl_logit)
            acc[1] += float(kl_tuned)
            acc[2] += len(s)
        tables = self._tables(adapter, batch, acts)
        if self.translators is None and self.steps:
            self._train(adapter, acts, s, p, final)
        return tables

    def _train(self, adapter, acts, s, p, final) -> None:
        import torch
        import torch.nn.functional as F

        layers = self._layers(adapter)
        hs = [acts[lens_site(layer)][s, p].float() for layer in layers]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + self._kl[layers[0]][2])  # reproducible, and different per batch
            for _ in range(self.steps):
                self._opt.zero_grad()
                loss = sum(
                    F.kl_div(F.log_softmax(lens_logits(adapter, self._tr(i, h)), -1), final, log_target=True, reduction="batchmean")
                    for i, h in enumerate(hs)
                )
                loss.backward()
                self._opt.step()

    def result(self) -> dict[str, Any]:
        out = super().result()
        out["kl"] = {str(layer): {"logit_lens": a / n, "tuned_lens": b / n, "n_tokens": n} for layer, (a, b, n) in sorted(self._kl.items())}
        out["trained"] = self.translators is None
        return out

    def artifacts(self, out_dir: Path) -> list[Path]:
        import torch

        if self._tr is None:
            return []
        from safetensors.torch import save_file

        path = Path(out_dir) / "tuned_lens.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self._tr.weight.detach().contiguous(), "bias": self._tr.bias.detach().contiguous(),
                   "layers": torch.tensor(self._tr.layers)}, str(path))
        return [path]

    def figures(self, out_dir: Path) -> list[Path]:
        from embedlens.figures import layer_curves

        out = super().figures(out_dir)
        kl = self.result()["kl"]
        if kl:
            xs = [int(k) for k in kl]
            out.append(layer_curves({"logit lens": (xs, [v["logit_lens"] for v in kl.values()]),
                                     "tuned lens": (xs, [v["tuned_lens"] for v in kl.values()])},
                                    Path(out_dir) / "tuned_lens_kl.png", xlabel="LLM layer (hidden state read)",
                                    ylabel="held-out KL to the final layer\n(nats per token)", legend_title="read-out",
                                    title="Held-out KL per layer: logit lens vs tuned lens"))
        return out
