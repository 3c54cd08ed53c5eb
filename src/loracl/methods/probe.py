"""probe: the backbone stays frozen and only the classifier learns (the lower bound for adaptation)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from loracl.methods.base import Method, MethodOptions
from loracl.methods.routing import RoutedInferenceOptions


class ProbeOptions(MethodOptions, RoutedInferenceOptions):
    """No knobs of its own; routed inference gives the floor that routed methods must clear."""


class Probe(Method):
    """With the prototype head nothing trains at all: nearest class mean on frozen features.

    The backbone never changes, so pooled features are computed once per example and cached in memory
    (keyed by task, split and position), which makes extra epochs and evaluation nearly free.
    """

    name = "probe"
    task_models = ("classifier",)
    needs_class_head = "it trains only a classifier head over frozen features"
    description = "frozen backbone, classifier only (lower bound)"
    Options: ClassVar[type[MethodOptions]] = ProbeOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._feature_cache: dict[tuple, torch.Tensor] = {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.context.head.type == "prototype":
            return []  # the training-free floor: prototypes only
        return super().trainable_parameters()

    @torch.no_grad()
    def frozen_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Pooled features [B, H], from the cache where every example of the batch is in it."""
        assert self.model is not None
        keys = batch.get("example_keys")
        if keys is not None and all(key in self._feature_cache for key in keys):
            return torch.stack([self._feature_cache[key] for key in keys])
        features = self.model.features(batch["inputs"])
        if keys is not None:
            self._feature_cache.update(zip(keys, features.detach()))
        return features

    def batch_routing_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The `base` router reads exactly the probe's frozen features: answer from the cache."""
        assert isinstance(self.options, RoutedInferenceOptions)
        if self.options.router_features == "base":
            return self.frozen_features(batch)
        return super().batch_routing_features(batch)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.model is not None
        return self.model.head(self.frozen_features(batch))

    def features_for_prototypes(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.frozen_features(batch)

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        assert self.model is not None
        features = self.frozen_features(batch)
        if self.context.head.type == "prototype":
            return self.model.prototypes(features)
        return self.model.head(features)
