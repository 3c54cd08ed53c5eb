"""The model a method trains: a backbone, a growing linear head and a prototype head."""

from __future__ import annotations

import torch
from torch import nn

from loracl.backbones.base import Backbone
from loracl.backbones.heads import LinearHead, PrototypeHead


class ContinualClassifier(nn.Module):
    """Backbone features -> linear logits (training signal) or prototype scores (nearest class mean)."""

    def __init__(self, backbone: Backbone, prototype_metric: str = "cosine", cosine_scale: float | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(backbone.hidden_size, cosine_scale)
        self.prototypes = PrototypeHead(backbone.hidden_size, prototype_metric)

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features [B, H]."""
        return self.backbone(**inputs)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Linear-head logits [B, classes seen]."""
        return self.head(self.features(inputs))
