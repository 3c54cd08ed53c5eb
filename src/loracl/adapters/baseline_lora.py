"""The LoraLayer variant SD-LoRA needs, without changing LoraLayer itself.

* MagnitudeLoraLayer (SD-LoRA): each branch's delta is multiplied by a learnable magnitude held outside the
  layer (scalars shared by all layers) plus this layer's own assimilated magnitude (SD-LoRA-KD) and, for frozen
  branches, divided by a fixed norm of its direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from loracl.adapters.lora import LoraLayer

DirectionNorm = Literal["factor", "product"]


class MagnitudeLoraLayer(LoraLayer):
    """h = W0 x + sum_i (alpha_i + beta_i) * s B_i A_i x / n_i, n_i = 1 for the branch in training, else a norm
    of B_i A_i; a frozen branch whose direction is zero (absorbed by SD-LoRA-KD) adds nothing.

    `magnitude_of(branch_name)` returns the (shared, learnable) scalar alpha of a branch; `norm` picks n_i:
    "factor" = ||B_i||_F ||A_i||_F (SD-LoRA code), "product" = ||B_i A_i||_F (SD-LoRA paper). beta_i
    (`assimilated`, 0 unless SD-LoRA-KD folded a later direction into this one) is this layer's own, not trained.
    """

    def __init__(self, base_layer: nn.Module, name: str, magnitude_of: Callable[[str], torch.Tensor], norm: DirectionNorm) -> None:
        super().__init__(base_layer, name)
        self.magnitude_of = magnitude_of  # a plain callable, so the shared scalars are not registered per layer
        self.norm = norm
        self.unnormalized_branch: str | None = None
        self.assimilated: dict[str, float] = {}  # SD-LoRA-KD's per-layer magnitude offsets, by branch

    def direction_norm(self, branch_name: str) -> torch.Tensor:
        """n_i of a branch (1 for the branch being trained); no gradient flows into it."""
        if branch_name == self.unnormalized_branch:
            return torch.ones((), device=self.base_layer.weight.device)
        return self.frozen_norm(branch_name)

    def frozen_norm(self, branch_name: str) -> torch.Tensor:
        """n_i as the branch will have it once frozen (0 for a zeroed branch)."""
        branch = self.branches[branch_name]
        with torch.no_grad():
            if self.norm == "factor":
                return branch.lora_B.norm() * branch.lora_A.norm()
            return (branch.delta_weight() / branch.scaling).norm()

    def direction(self, branch_name: str) -> torch.Tensor:
        """B_i A_i / n_i, shaped like W0, with the frozen norm even while the branch trains (zero for a zero branch)."""
        branch = self.branches[branch_name]
        with torch.no_grad():
            norm = self.frozen_norm(branch_name)
            product = branch.delta_weight() / branch.scaling
            return product / norm if norm > 0 else torch.zeros_like(product)

    def coefficient(self, branch_name: str) -> torch.Tensor:
        norm = self.direction_norm(branch_name)
        # an absorbed (zeroed) frozen direction scales to 0; tensor ops, not `if`, so no device sync per forward
        nonzero = norm > 0
        scaled = (self.magnitude_of(branch_name) + self.assimilated.get(branch_name, 0.0)) / torch.where(nonzero, norm, 1.0)
        return torch.where(nonzero, scaled, 0.0)

    def branch_scale(self, branch_name: str) -> torch.Tensor:
        return self.coefficient(branch_name)

    def branch_output(self, branch_name: str, branch: nn.Module, dropped: torch.Tensor) -> torch.Tensor:
        return branch(dropped.to(branch.dtype)) * self.coefficient(branch_name).to(branch.dtype)
