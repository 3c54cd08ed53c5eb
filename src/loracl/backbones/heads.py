"""Classifier heads that grow as classes arrive: a linear head and a nearest-class-mean prototype head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loracl.seeding import derived_generator


def mask_to_classes(scores: torch.Tensor, class_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Scores [B, C] with every class outside `class_ids` set to -inf (task-incremental protocol, routed tasks)."""
    allowed = torch.full_like(scores, float("-inf"))
    allowed[:, class_ids] = 0.0
    return scores + allowed


def head_rows_generator(seed: int, task_index: int) -> torch.Generator:
    """The seeded generator a task's new head rows are drawn from (begin_task and FWT's untrained model agree)."""
    return derived_generator(seed, task_index)


class LinearHead(nn.Module):
    """One weight block per task, concatenated in class-id order; old blocks can be frozen.

    With `cosine_scale` set it is a cosine classifier, logits = s · cos(feature, row) with no bias: every row's
    logits lie in [-s, s] whatever its norm, so rows trained on different tasks stay comparable (the plain
    head's known weakness in class-incremental runs, docs/harness.md).
    """

    def __init__(self, hidden_size: int, cosine_scale: float | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cosine_scale = cosine_scale
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.class_ids: list[int] = []
        # an empty buffer that `.to(device)` moves: rows added later are created where the head lives
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def add_classes(self, class_ids: list[int], generator: torch.Generator | None = None) -> list[int]:
        """Add rows for the ids not seen yet (ids arrive in increasing order); returns the new ids."""
        new_ids = [class_id for class_id in class_ids if class_id not in self.class_ids]
        if not new_ids:
            return []
        if new_ids != list(range(self.num_classes, self.num_classes + len(new_ids))):
            raise ValueError(f"class ids must arrive in order, got {new_ids} after {self.num_classes} classes")
        device = self.device_anchor.device
        bound = 1.0 / self.hidden_size**0.5  # nn.Linear's default init
        weight = (torch.rand(len(new_ids), self.hidden_size, generator=generator) * 2 - 1) * bound
        self.weights.append(nn.Parameter(weight.to(device)))
        # the cosine head has no bias: its (zero) bias rows exist only so both heads share one state layout
        self.biases.append(nn.Parameter(torch.zeros(len(new_ids), device=device), requires_grad=self.cosine_scale is None))
        self.class_ids.extend(new_ids)
        return new_ids

    def freeze_all(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def unfreeze_classes(self, class_ids: list[int]) -> None:
        """Train again the blocks that hold any of these classes (a task reusing classes of an earlier one).
        Rows of other classes in such a block get no gradient from a current-task loss, so they stay put."""
        wanted = set(class_ids)
        start = 0
        for weight, bias in zip(self.weights, self.biases):
            block = set(self.class_ids[start : start + weight.shape[0]])
            start += weight.shape[0]
            if block & wanted:
                weight.requires_grad_(True)
                bias.requires_grad_(self.cosine_scale is None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, num_classes]."""
        weight = torch.cat(list(self.weights), dim=0)
        if self.cosine_scale is not None:
            cosine = F.normalize(features, dim=-1) @ F.normalize(weight.to(features.dtype), dim=-1).T
            return self.cosine_scale * cosine
        bias = torch.cat(list(self.biases), dim=0)
        return F.linear(features, weight.to(features.dtype), bias.to(features.dtype))


class PrototypeHead(nn.Module):
    """Nearest class mean on pooled features; logits are cosine similarities or negative squared distances."""

    def __init__(self, hidden_size: int, metric: str = "cosine", dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.metric = metric
        self.register_buffer("sums", torch.zeros(0, hidden_size, dtype=dtype))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    def reset_classes(self, class_ids: list[int]) -> None:
        """Forget the running sums of these classes (they are recomputed from the current task's data)."""
        self._grow(max(class_ids) + 1)
        for class_id in class_ids:
            self.sums[class_id].zero_()
            self.counts[class_id] = 0

    def _grow(self, num_classes: int) -> None:
        if num_classes > self.num_classes:
            extra = num_classes - self.num_classes
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of features [B, H] to their classes' running sums."""
        self._grow(int(labels.max()) + 1)
        self.sums.index_add_(0, labels.to(self.sums.device), features.to(self.sums))
        self.counts.index_add_(0, labels.to(self.counts.device), torch.ones_like(labels, dtype=self.counts.dtype))

    def means(self) -> torch.Tensor:
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1)).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, num_classes]; classes with no examples yet score -inf."""
        means = self.means().to(features.device)
        if self.metric == "cosine":
            scores = F.normalize(features.float(), dim=-1) @ F.normalize(means, dim=-1).T
        else:
            scores = -torch.cdist(features.float(), means).pow(2)
        return scores.masked_fill(self.counts.to(features.device).unsqueeze(0) == 0, float("-inf"))
