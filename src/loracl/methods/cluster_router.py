"""LoRAC-IPC's task-identity inference (spec lorac-ipc.md §3.3, eq. 11) on the Router contract.

Each (task, class) slot keeps up to K k-means clusters of its normalised features, each with a precision through
the official code's steps (covariance + ridge·I, + mean(diag)·I, correlation-normalised, pseudo-inverted), or a
diagonal one, or one precision pooled over every cluster; a test example goes to the task of the slot whose
nearest cluster is nearest in Mahalanobis distance.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F

from loracl.backbones.alignment import kmeans_labels
from loracl.methods.routing import Router

ClusterCovariance = Literal["full", "diag", "shared"]


def tii_precision(members: torch.Tensor, ridge: float, full: bool) -> torch.Tensor:
    """Spec §3.3 steps 2-4: covariance + ridge·I, shrink by mean(diag)·I, correlation-normalise, pseudo-invert."""
    hidden = members.shape[1]
    members = members.double()
    if members.shape[0] > 1:
        cov = torch.cov(members.T)
    else:
        cov = torch.zeros(hidden, hidden, dtype=torch.float64, device=members.device)  # one member: no spread to estimate
    return precision_from_covariance(cov, ridge, full)


def precision_from_covariance(cov: torch.Tensor, ridge: float, full: bool = True) -> torch.Tensor:
    """Spec §3.3 steps 3-4 on a covariance [H, H]: + ridge·I, + mean(diag)·I, correlation-normalise, pseudo-invert
    (diag: inverse shrunk variances, no correlation step)."""
    hidden = cov.shape[0]
    identity = torch.eye(hidden, dtype=torch.float64, device=cov.device)
    cov = cov.double() + ridge * identity
    cov = cov + torch.diagonal(cov).mean() * identity
    if not full:
        return (1.0 / torch.diagonal(cov)).float()
    std = torch.diagonal(cov).sqrt()
    correlation = cov / torch.outer(std, std)
    return torch.linalg.pinv(correlation).float()


def mahalanobis_to_classes(
    queries: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Eq. (11): d_c(z) = min_k (z−μ_ck)ᵀ P_ck (z−μ_ck); queries [B, H], means [C, K, H],
    precisions [C, K, H, H] (or [C, K, H] diagonal, or [H, H] shared), valid [C, K] -> distances [B, C]."""
    diff = queries[:, None, None, :] - means[None]  # [B, C, K, H]
    if precisions.dim() == 2:  # one precision shared by every class and cluster
        projected = diff @ precisions
    elif precisions.dim() == 4:
        projected = torch.einsum("bckh,ckhg->bckg", diff, precisions)
    else:
        projected = diff * precisions[None]
    distances = (projected * diff).sum(-1)  # [B, C, K]
    distances = distances.masked_fill(~valid[None], float("inf"))
    return distances.min(dim=-1).values


class ClusterRouter(Router):
    """k-means clusters per slot, each a Gaussian with the code's correlation-normalised precision."""

    def __init__(self, feature_size: int, clusters: int, ridge: float, covariance: ClusterCovariance, seed: int) -> None:
        super().__init__()
        self.clusters = clusters
        self.ridge = ridge
        self.covariance = covariance
        self.seed = seed
        precision_width = {"full": (feature_size, feature_size), "diag": (feature_size,), "shared": (0,)}[covariance]
        self.register_buffer("cluster_means", torch.zeros(0, clusters, feature_size))  # [slots, K, H]
        self.register_buffer("cluster_precisions", torch.zeros(0, clusters, *precision_width))
        self.register_buffer("cluster_valid", torch.zeros(0, clusters, dtype=torch.bool))
        # covariance shared: the pooled within-cluster scatter and its member count (float64: sums over many
        # tasks); empty for per-cluster covariances, so their checkpoints carry nothing extra
        scatter_width = feature_size if covariance == "shared" else 0
        self.register_buffer("scatter", torch.zeros(scatter_width, scatter_width, dtype=torch.float64))
        self.register_buffer("scatter_count", torch.zeros((), dtype=torch.float64))
        self._shared_precision: tuple[tuple[float, float], torch.Tensor] | None = None

    def add_task(self, task_index: int, class_ids: list[int]) -> dict[int, int]:
        """New slots (routing.Router.add_task) without clusters yet."""
        slot_of_class = super().add_task(task_index, class_ids)
        grow = len(class_ids)
        for name in ("cluster_means", "cluster_precisions", "cluster_valid"):
            buffer = getattr(self, name)
            setattr(self, name, torch.cat([buffer, buffer.new_zeros(grow, *buffer.shape[1:])]))
        return slot_of_class

    @torch.no_grad()
    def record_task(self, task_index: int, class_ids: list[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """k-means over each class's normalised features (seeded), then each cluster's mean and precision."""
        slot_of_class = self.add_task(task_index, class_ids)
        pairs = list(batches)
        features = torch.cat([F.normalize(batch_features.float().cpu(), dim=-1) for batch_features, _ in pairs])  # [n, H]
        labels = torch.cat([batch_labels.cpu() for _, batch_labels in pairs])
        for class_id, slot in slot_of_class.items():
            members = features[labels == class_id]
            assignment = kmeans_labels(members, self.clusters, self.seed)
            for cluster in range(int(assignment.max()) + 1 if len(members) else 0):
                cluster_members = members[assignment == cluster]
                if cluster_members.shape[0] == 0:
                    continue
                mean = cluster_members.mean(0)
                self.cluster_means[slot, cluster] = mean.to(self.cluster_means)
                if self.covariance == "shared":
                    centred = (cluster_members - mean).double().to(self.scatter.device)
                    self.scatter += centred.T @ centred
                    self.scatter_count += len(cluster_members)
                else:
                    precision = tii_precision(cluster_members, self.ridge, self.covariance == "full")
                    self.cluster_precisions[slot, cluster] = precision.to(self.cluster_precisions)
                self.cluster_valid[slot, cluster] = True

    def shared_precision(self) -> torch.Tensor:
        """covariance shared: the pooled within-cluster covariance through the code's ridge, shrinkage and
        correlation steps, inverted once per change of the statistics [H, H]."""
        key = (float(self.scatter_count), float(self.scatter.sum()))
        if self._shared_precision is None or self._shared_precision[0] != key:
            covariance = self.scatter.cpu() / max(float(self.scatter_count) - 1.0, 1.0)
            self._shared_precision = (key, precision_from_covariance(covariance, self.ridge).to(self.cluster_means.device))
        return self._shared_precision[1]

    def slot_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Minus the distance to each slot's nearest valid cluster [B, slots] (-inf: a slot without clusters)."""
        precisions = self.shared_precision() if self.covariance == "shared" else self.cluster_precisions
        queries = F.normalize(features.float(), dim=-1).to(self.cluster_means.device)
        return -mahalanobis_to_classes(queries, self.cluster_means, precisions, self.cluster_valid)
