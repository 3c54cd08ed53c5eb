"""The model a method trains: a backbone, a growing linear head and a prototype head."""

from __future__ import annotations

import torch
from torch import nn

from loracl.adapters.base import AdapterLayer
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

    def train_adapters(self) -> ContinualClassifier:
        """Train mode for everything but the frozen backbone's own layers: the head, method modules and the adapter
        layers inside the backbone (their dropout acts, as in PEFT), while the backbone's dropout stays off."""
        self.train()
        self.backbone.eval()
        for module in self.backbone.modules():
            if isinstance(module, AdapterLayer):
                module.train()
        return self
