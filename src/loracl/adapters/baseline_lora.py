"""LoraLayer variants the peer baselines need, without changing LoraLayer itself.

* SharedDropoutLoraLayer (O-LoRA): one dropout mask on x feeds every branch, old and new, as in the O-LoRA
  code (baselines.md 1.2); LoraLayer gives each branch its own dropout.
* MagnitudeLoraLayer (SD-LoRA): each branch's delta is multiplied by a learnable magnitude held outside the
  layer (scalars shared by all layers) and, for frozen branches, divided by a fixed norm of its direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from loracl.adapters.lora import LoraLayer

DirectionNorm = Literal["factor", "product"]


class SharedDropoutLoraLayer(LoraLayer):
    """LoRA branches summed on one dropped-out input: h = W0 x + sum_i s B_i A_i dropout(x)."""

    def __init__(self, base_layer: nn.Module, name: str = "", dropout: float = 0.0) -> None:
        super().__init__(base_layer, name)
        self.shared_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        active = self.active_branches()
        if not active:
            return result
        dropped = self.shared_dropout(x)  # branches are built with dropout 0, so they add none of their own
        for _, branch in active:
            result = result + branch(dropped.to(branch.lora_A.dtype)).to(result.dtype)
        return result


class MagnitudeLoraLayer(LoraLayer):
    """h = W0 x + sum_i alpha_i * s B_i A_i x / n_i, n_i = 1 for the branch in training, else a norm of B_i A_i.

    `magnitude_of(branch_name)` returns the (shared, learnable) scalar alpha of a branch; `norm` picks n_i:
    "factor" = ||B_i||_F ||A_i||_F (SD-LoRA code), "product" = ||B_i A_i||_F (SD-LoRA paper).
    """

    def __init__(self, base_layer: nn.Module, name: str, magnitude_of: Callable[[str], torch.Tensor], norm: DirectionNorm) -> None:
        super().__init__(base_layer, name)
        self.magnitude_of = magnitude_of  # a plain callable, so the shared scalars are not registered per layer
        self.norm = norm
        self.unnormalized_branch: str | None = None
        self._merged_deltas: dict[str, torch.Tensor] = {}

    def direction_norm(self, branch_name: str) -> torch.Tensor:
        """n_i of a branch (1 for the branch being trained); no gradient flows into it."""
        if branch_name == self.unnormalized_branch:
            return torch.ones((), device=self.base_layer.weight.device)
        branch = self.branches[branch_name]
        with torch.no_grad():
            if self.norm == "factor":
                return branch.lora_B.norm() * branch.lora_A.norm()
            return (branch.lora_B.flatten(1) @ branch.lora_A.flatten(1)).norm()

    def coefficient(self, branch_name: str) -> torch.Tensor:
        return self.magnitude_of(branch_name) / self.direction_norm(branch_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        for name, branch in self.active_branches():
            delta = branch(x.to(branch.lora_A.dtype)) * self.coefficient(name).to(branch.lora_A.dtype)
            result = result + delta.to(result.dtype)
        return result

    def delta_weight(self, branch_names: list[str] | None = None) -> torch.Tensor:
        names = [name for name in self.branches if name not in self.disabled_branches] if branch_names is None else branch_names
        total = torch.zeros_like(self.base_layer.weight)
        for name in names:
            total = total + (self.branches[name].delta_weight() * self.coefficient(name)).to(total.dtype)
        return total

    @torch.no_grad()
    def merge(self, branch_names: list[str] | None = None) -> None:
        """Add alpha_i / n_i * s B_i A_i into W0; the exact added tensor is kept so unmerge undoes it."""
        names = [name for name, _ in self.active_branches()] if branch_names is None else branch_names
        for name in names:
            if name in self.merged_branches:
                continue
            delta = self.delta_weight([name]).to(self.base_layer.weight.dtype)
            self.base_layer.weight.add_(delta)
            self._merged_deltas[name] = delta
            self.merged_branches.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_branches:
            name = self.merged_branches.pop()
            self.base_layer.weight.sub_(self._merged_deltas.pop(name))
