"""The tuned lens's translators: one affine map per LLM layer (a torch module, imported when a tuned lens is built)."""

from __future__ import annotations

import torch


class Translators(torch.nn.Module):
    """One affine translator per layer, ``h + A h + b`` with A, b starting at zero (the logit lens)."""

    def __init__(self, layers: list[int], d: int):
        super().__init__()
        self.layers = list(layers)
        self.weight = torch.nn.Parameter(torch.zeros(len(layers), d, d))
        self.bias = torch.nn.Parameter(torch.zeros(len(layers), d))

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h + h @ self.weight[i].T + self.bias[i]
