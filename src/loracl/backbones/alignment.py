"""Classifier alignment on stored class statistics: per-class Gaussians of pooled features (no raw examples) and
a head re-trained on pseudo-features sampled from them.

In a class-incremental run the linear head sees only the current task's classes while it trains, so rows of
different tasks are never compared during training and the newest (or the oldest) rows win at test time
(docs/harness.md). Re-training the whole head on samples from every seen class's Gaussians puts all rows on one
scale. LoRAC-IPC's task-adaptive prediction (TAP) is this step with the official code's settings; `head.align`
offers it to every method (SLCA's classifier alignment is the same idea).
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
    """Per class: up to `centroids` k-means clusters of its features, each a diagonal Gaussian (mean, std).

    Buffers (rows in class-id order, so they travel with a method's state_dict): means and stds
    [classes, centroids, H], valid [classes, centroids].
    """

    def __init__(self, hidden: int, centroids: int, ridge: float = 1.0e-4, device: torch.device | None = None) -> None:
        super().__init__()
        self.centroids = centroids
        self.ridge = ridge
        self.register_buffer("means", torch.zeros(0, centroids, hidden, device=device))
        self.register_buffer("stds", torch.zeros(0, centroids, hidden, device=device))
        self.register_buffer("valid", torch.zeros(0, centroids, dtype=torch.bool, device=device))

    def store(self, class_id: int, members: torch.Tensor, seed: int) -> None:
        """Fit one class's clusters from its features [n, H] (CPU, fp32); replaces what the class had."""
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
        put_row(self, "means", class_id, means)
        put_row(self, "stds", class_id, stds)
        put_row(self, "valid", class_id, valid)

    def store_features(self, features: torch.Tensor, labels: torch.Tensor, class_ids: list[int], seed: int) -> None:
        """Fit every listed class from a task's features [n, H] and labels [n]."""
        for class_id in class_ids:
            self.store(class_id, features[labels == class_id], seed)


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
    seen = head.num_classes
    class_ids, clusters = torch.nonzero(gaussians.valid[:seen].cpu(), as_tuple=True)
    means = gaussians.means[class_ids, clusters].cpu()  # [M, H]
    stds = gaussians.stds[class_ids, clusters].cpu()
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
