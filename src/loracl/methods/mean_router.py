"""The class-mean router: one mean per (task, class) slot of L2-normalised frozen features and one within-class
scatter pooled over every slot, scored by cosine similarity or by Mahalanobis distance under the shared, shrunk
covariance (linear discriminant analysis). MetaLoRA routes with it, and the [D] `routed_inference` option gives it
to the LoRA baselines, FM-LoRA and OA-Adapter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from loracl.backbones.heads import PrototypeHead
from loracl.methods.routing import Router, RouterMetric


class MeanRouter(Router):
    """Slot means and the pooled scatter of normalised frozen features (cosine or LDA scoring)."""

    def __init__(self, feature_size: int, metric: RouterMetric = "mahalanobis", shrinkage: float = 0.1) -> None:
        super().__init__()
        self.metric = metric
        self.shrinkage = shrinkage
        # one row per (task, class) slot; float32 sums: a slot is filled once, from one task's data, and its
        # 4 bytes per feature are stored for every class of every task (the scatter below stays float64)
        self.means = PrototypeHead(feature_size, "cosine", dtype=torch.float32)
        self.register_buffer("scatter", torch.zeros(feature_size, feature_size, dtype=torch.float64))
        self.register_buffer("scatter_count", torch.zeros((), dtype=torch.float64))
        self._precision: tuple[tuple[float, float, int], torch.Tensor] | None = None

    def add_task(self, task_index: int, class_ids: list[int]) -> dict[int, int]:
        """New slots (routing.Router.add_task) with empty means."""
        slot_of_class = super().add_task(task_index, class_ids)
        self.means.reset_classes(list(slot_of_class.values()))
        return slot_of_class

    @torch.no_grad()
    def record_task(self, task_index: int, class_ids: list[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A finished task's slots from (frozen features [B, d], global labels [B]) batches."""
        slot_of_class = self.add_task(task_index, class_ids)
        for features, labels in batches:
            slots = torch.tensor([slot_of_class[int(label)] for label in labels], device=features.device)
            self.accumulate(features, slots)

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, slots: torch.Tensor) -> None:
        """Add frozen features [B, d] of the given slots [B] to the means and the pooled scatter."""
        normalised = F.normalize(features.float(), dim=-1)
        self.means.accumulate(normalised, slots)
        wide = normalised.to(self.scatter)
        self.scatter += wide.T @ wide
        self.scatter_count += len(normalised)

    def precision(self) -> torch.Tensor:
        """Inverse of the shrunk within-class covariance [d, d]; computed once per change of the statistics (a
        pseudo-inverse per eval batch would cost more than the routing itself)."""
        key = (float(self.scatter_count), float(self.scatter.sum()), self.num_slots)
        if self._precision is not None and self._precision[0] == key:
            return self._precision[1]
        total = self.scatter_count.clamp(min=1)
        means = self.means.means().double()
        counts = self.means.counts.to(means.device)
        covariance = self.scatter / total - (means.T * counts) @ means / total  # within-class covariance
        dim = covariance.shape[0]
        identity = torch.eye(dim, dtype=covariance.dtype, device=covariance.device)
        covariance = (1 - self.shrinkage) * covariance + self.shrinkage * covariance.trace() / dim * identity
        precision = torch.linalg.pinv(covariance).float()
        self._precision = (key, precision)
        return precision

    def slot_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, slots]: cosine to each slot mean, or minus the Mahalanobis distance; empty slots -inf."""
        normalised = F.normalize(features.float(), dim=-1)
        if self.metric == "cosine":
            return self.means(normalised)
        means = self.means.means().to(normalised.device)
        counts = self.means.counts.to(normalised.device)
        precision = self.precision().to(normalised.device)
        difference = normalised.unsqueeze(1) - means.unsqueeze(0)  # [B, slots, d]
        scores = -torch.einsum("bsd,de,bse->bs", difference, precision, difference)
        return scores.masked_fill(counts.unsqueeze(0) == 0, float("-inf"))


__all__ = ["MeanRouter"]
