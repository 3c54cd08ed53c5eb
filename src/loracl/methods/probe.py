"""probe: the backbone stays frozen and only the classifier learns (the lower bound for adaptation)."""

from __future__ import annotations

from typing import Any

import torch

from loracl.methods.base import Method


class Probe(Method):
    """With the prototype head nothing trains at all: nearest class mean on frozen features."""

    name = "probe"
    description = "frozen backbone, classifier only (lower bound)"

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.context.head.type == "prototype":
            return []  # the training-free floor: prototypes only
        return super().trainable_parameters()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.model is not None
        with torch.no_grad():
            features = self.model.features(batch["inputs"])
        return self.model.head(features)
