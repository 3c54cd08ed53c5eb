"""Classifier alignment on stored class statistics: per-class Gaussians of pooled features (no raw examples) and
a head re-trained on pseudo-features sampled from them.

In a class-incremental run the linear head sees only the current task's classes while it trains, so rows of
different tasks are never compared during training and the newest (or the oldest) rows win at test time
(docs/harness.md). Re-training the whole head on samples from every seen class's Gaussians puts all rows on one
scale. LoRAC-IPC's task-adaptive prediction (TAP) is this step with the official code's settings (class-keyed rows,
one batch per old class per epoch); `head.align` offers it to every method with one row per (task, class) and one
full pass over the samples per epoch (SLCA's classifier alignment is the same idea).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def put_row(module: nn.Module, buffer_name: str, row: int, value: torch.Tensor) -> None:
    """Write `value` into row `row` of a registered buffer, growing the buffer (zero rows) to hold it."""
    buffer = getattr(module, buffer_name)
    if row >= buffer.shape[0]:
        grown = buffer.new_zeros(row + 1, *buffer.shape[1:])
        grown[: buffer.shape[0]] = buffer
        setattr(module, buffer_name, grown)
        buffer = grown
    buffer[row] = value.to(buffer)


def kmeans_labels(features: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Cluster assignments of [n, H] features into min(clusters, n) groups (scikit-learn, seeded)."""
    from sklearn.cluster import KMeans

    count = min(clusters, features.shape[0])
    if count <= 1:
        return torch.zeros(features.shape[0], dtype=torch.long)
    labels = KMeans(n_clusters=count, random_state=seed, n_init="auto").fit_predict(features.double().numpy())
    return torch.as_tensor(labels, dtype=torch.long)


class ClassGaussians(nn.Module):
    """Rows of up to `centroids` k-means clusters of one class's features, each a diagonal Gaussian (mean, std).

    Buffers (so they travel with a method's state_dict): means and stds [rows, centroids, H], valid
    [rows, centroids], and row_class [rows], the class each row belongs to. `store` keys rows by class id (a class
    seen again replaces its row: LoRAC-IPC's TAP); `append` adds one row per (task, class), so a class that comes
    back in a later task (shared label names, domain-incremental streams) keeps the statistics of every task.
    """

    def __init__(self, hidden: int, centroids: int, ridge: float = 1.0e-4, device: torch.device | None = None) -> None:
        super().__init__()
        self.centroids = centroids
        self.ridge = ridge
        self.register_buffer("means", torch.zeros(0, centroids, hidden, device=device))
        self.register_buffer("stds", torch.zeros(0, centroids, hidden, device=device))
        self.register_buffer("valid", torch.zeros(0, centroids, dtype=torch.bool, device=device))
        self.register_buffer("row_class", torch.zeros(0, dtype=torch.long, device=device))

    def fit(self, members: torch.Tensor, seed: int, fallback_single: bool = False) -> tuple[torch.Tensor, ...]:
        """Cluster means, stds and validity of one class's features [n, H]; clusters without spread are invalid.
        With `fallback_single`, a class whose clusters are all invalid (fewer members than clusters) but has
        spread gets one Gaussian over all its members instead."""
        means = torch.zeros(self.centroids, members.shape[1])
        stds = torch.zeros_like(means)
        valid = torch.zeros(self.centroids, dtype=torch.bool)
        assignment = kmeans_labels(members, self.centroids, seed)
        for cluster in range(int(assignment.max()) + 1 if len(members) else 0):
            cluster_members = members[assignment == cluster]
            variance = cluster_members.var(dim=0, correction=0)  # population variance, as np.var
            if cluster_members.shape[0] == 0 or variance.mean() == 0:
                continue  # no spread (e.g. one member): LoRAC-IPC's code skips such clusters
            means[cluster] = cluster_members.mean(0)
            stds[cluster] = (variance + self.ridge).sqrt()
            valid[cluster] = True
        if fallback_single and not valid.any() and len(members) > 1 and members.var(dim=0, correction=0).mean() > 0:
            means[0] = members.mean(0)
            stds[0] = (members.var(dim=0, correction=0) + self.ridge).sqrt()
            valid[0] = True
        return means, stds, valid

    def _put(self, row: int, class_id: int, fitted: tuple[torch.Tensor, ...]) -> None:
        for name, value in zip(("means", "stds", "valid"), fitted):
            put_row(self, name, row, value)
        put_row(self, "row_class", row, torch.tensor(class_id))

    def store(self, class_id: int, members: torch.Tensor, seed: int) -> None:
        """Row `class_id` <- the class's clusters from its features [n, H] (CPU, fp32), replacing what it had."""
        self._put(class_id, class_id, self.fit(members, seed))
        self.row_class = torch.arange(self.means.shape[0], device=self.row_class.device)  # keyed: row = class id

    def append(self, class_id: int, members: torch.Tensor, seed: int) -> None:
        """A new row for this (task, class): earlier rows of the same class are kept."""
        self._put(self.row_class.shape[0], class_id, self.fit(members, seed, fallback_single=True))

    def append_features(self, features: torch.Tensor, labels: torch.Tensor, class_ids: list[int], seed: int) -> None:
        """One new row per listed class, fitted from a task's features [n, H] and labels [n]."""
        for class_id in class_ids:
            self.append(class_id, features[labels == class_id], seed)


def realign_head(
    head: nn.Module,
    gaussians: ClassGaussians,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    samples_per_cluster: int,
    iterations_per_epoch: int | None,
    generator: torch.Generator,
) -> None:
    """SGD (cosine schedule) on every head row with pseudo-features from the seen classes' Gaussians.

    Each epoch draws `samples_per_cluster` samples per valid cluster, shuffles them, and takes
    `iterations_per_epoch` batches (None: one pass over the samples). The head's requires_grad flags are restored.
    """
    parameters = list(head.parameters())
    device = parameters[0].device
    flags = [parameter.requires_grad for parameter in parameters]
    head.requires_grad_(True)
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    known = gaussians.valid.cpu() & (gaussians.row_class.cpu() < head.num_classes).unsqueeze(1)
    rows, clusters = torch.nonzero(known, as_tuple=True)
    class_ids = gaussians.row_class.cpu()[rows]
    means = gaussians.means[rows, clusters].cpu()  # [M, H]
    stds = gaussians.stds[rows, clusters].cpu()
    if len(class_ids) == 0:
        epochs = 0
    for _ in range(epochs):
        noise = torch.randn(len(class_ids), samples_per_cluster, means.shape[1], generator=generator)
        samples = (means[:, None] + stds[:, None] * noise).reshape(-1, means.shape[1])  # [M·per, H]
        labels = class_ids.repeat_interleave(samples_per_cluster)
        order = torch.randperm(len(labels), generator=generator)
        iterations = iterations_per_epoch or -(-len(labels) // batch_size)
        for step in range(iterations):
            chosen = order[step * batch_size : (step + 1) * batch_size]
            if len(chosen) == 0:
                break
            loss = F.cross_entropy(head(samples[chosen].to(device)), labels[chosen].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    for parameter, flag in zip(parameters, flags):
        parameter.requires_grad_(flag)
