"""Task-identity inference from frozen features, shared by every method that routes a test example to one task.

`Router` is the contract: one slot per (task, class) of each finished task, filled from features of an extractor
that never changes, then a task index per test example. Two routers implement it: `MeanRouter` (mean_router.py:
class means under a shared shrunk covariance), used by MetaLoRA and the [D] `routed_inference` option, and
`ClusterRouter` (cluster_router.py: k-means clusters per slot, each with its own covariance), LoRAC-IPC's
task-identity inference. Here also: the routed-inference options, `predict_by_route` (the one routed-prediction
loop) and the routing-accuracy tally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from loracl.config import Float, StrictModel
from loracl.task_models.base import scatter_rows

RouterMetric = Literal["cosine", "mahalanobis"]


class RoutedInferenceOptions(StrictModel):
    """[D] routed inference (not in the method's paper or code): infer each test example's task from frozen
    features, serve it by the model as of that task (`routed_branches`, for methods with one branch per task)
    and score only that task's classes. Off by default; docs/methods/routed_inference.md."""

    routed_inference: bool = Field(
        default=False,
        description="Infer each test example's task from frozen features and serve it by the model as of that task, "
        "scoring only that task's classes (docs/methods/routed_inference.md). "
        "Source: our design (not in the paper or code).",
    )
    router: RouterMetric = Field(
        default="mahalanobis",
        description="How a test example is matched to the stored class means of normalised frozen features: "
        "`mahalanobis` under one shared, shrunk within-class covariance (linear discriminant analysis), or "
        "`cosine` similarity. Source: our design (not in the paper or code).",
    )
    router_features: Literal["base", "embed"] = Field(
        default="base",
        description="The frozen features the router reads: `base` = the frozen backbone's pooled output (one extra "
        "forward pass per test example, and per training example at the end of each task); `embed` = the mean of "
        "the embedding layer's output (nearly free; identifies text tasks well, image tasks poorly). "
        "Source: our design (not in the paper or code).",
    )
    router_shrinkage: Float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Shrinkage λ of the Mahalanobis router's shared covariance: Σ ← (1 − λ)Σ + λ·tr(Σ)/d·I. "
        "Source: our design (not in the paper or code).",
    )

    def fingerprint_dump(self) -> dict[str, Any]:
        """The routing keys count only when routing is on: turning it on changes a run's fingerprint, and runs
        written before the option existed keep theirs."""
        dumped = super().fingerprint_dump()
        if not self.routed_inference:
            for key in RoutedBranchOptions.model_fields:
                dumped.pop(key, None)
        return dumped


class RoutedBranchOptions(RoutedInferenceOptions):
    """Routed inference for methods with one adapter branch per task: `routed_branches` also switches off the
    branches of tasks after the routed one, so each example meets the adapters its task was trained with."""

    routed_branches: bool = Field(
        default=True,
        description="With `routed_inference`, also switch off the branches of tasks after the routed one, so each "
        "example meets the adapters its task was trained with (methods with one branch per task). "
        "Source: our design (not in the paper or code).",
    )


class Router(nn.Module):
    """The routing contract: one slot per (task, class) of each finished task, filled from frozen features; a
    task index per test example. Slots and their statistics are buffers, saved with the model's state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("slot_task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("slot_class", torch.zeros(0, dtype=torch.long))

    @property
    def num_slots(self) -> int:
        """How many (task, class) slots the router holds."""
        return int(self.slot_task.numel())

    def add_task(self, task_index: int, class_ids: list[int]) -> dict[int, int]:
        """New empty slots for a task's classes (statistics follow in record_task); returns class id -> slot."""
        first = self.num_slots
        device = self.slot_task.device
        self.slot_task = torch.cat([self.slot_task, torch.full((len(class_ids),), task_index, device=device)])
        self.slot_class = torch.cat([self.slot_class, torch.tensor(class_ids, dtype=torch.long, device=device)])
        return {class_id: first + offset for offset, class_id in enumerate(class_ids)}

    def record_task(self, task_index: int, class_ids: list[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A finished task's slots from (frozen features [B, d], global labels [B]) batches."""
        raise NotImplementedError

    def slot_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, slots]: higher is nearer; slots without statistics score -inf."""
        raise NotImplementedError

    @torch.no_grad()
    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Task index per example [B] from frozen features (never from the batch's task ids)."""
        if self.num_slots == 0:
            raise RuntimeError("the task router has no statistics yet: record a task before routing")
        return self.slot_task.to(features.device)[self.slot_scores(features).argmax(dim=1)]

    def task_classes(self, task_index: int) -> list[int]:
        """The class ids of a task's slots."""
        return self.slot_class[self.slot_task == task_index].tolist()


def predict_by_route(
    routes: torch.Tensor,
    batch: dict[str, Any],
    predict_group: Callable[[int, torch.Tensor, dict[str, Any]], torch.Tensor],
    fill: float,
) -> torch.Tensor:
    """The routed-prediction loop: the rows [n] routed to each task, as one sub-batch (its `task_ids` set to that
    task), through `predict_group(task_index, rows, group)`; the groups' predictions scattered back in order."""
    parts = []
    for task_index in routes.unique().tolist():
        rows = (routes == task_index).nonzero().squeeze(1)
        group = select_batch_rows(batch, rows)
        group["task_ids"] = torch.full((len(rows),), task_index)
        parts.append((rows, predict_group(task_index, rows, group)))
    return scatter_rows(parts, len(routes), fill)


def select_batch_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of the given rows: its inputs, labels, per-example keys and answer texts."""
    group: dict[str, Any] = {"inputs": select_rows(batch["inputs"], rows)}
    for key, value in batch.items():
        if key == "inputs":
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(batch["inputs"][next(iter(batch["inputs"]))]):
            group[key] = value[rows.to(value.device)]
        elif isinstance(value, list):
            group[key] = [value[row] for row in rows.tolist()]
    return group


def select_rows(inputs: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows [n] of every tensor in a batch of inputs."""
    return {key: value[rows.to(value.device)] for key, value in inputs.items()}


# Element-wise sums of a list of counts over every process evaluating a shard of the test split (the engine's
# MethodRun.sum_over_processes); `local_sum` is the one-process case. Every process must call it, in the same order.
SumOverProcesses = Callable[[list[int]], list[int]]


def local_sum(values: list[int]) -> list[int]:
    """The counts of the only process."""
    return list(values)


class RoutingTally:
    """Routes predicted during one task's evaluation, scored against its index once all its batches are done;
    one evaluation round (every task evaluated after one training task) at a time, earlier rounds' accuracies kept.
    Under sharded evaluation each process holds its shard's routes; close_task sums the counts over processes."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []
        self.counts: dict[str, list[int]] = {}
        self.history: list[float] = []  # overall routing accuracy of each closed round

    def close_round(self) -> None:
        """Keep the finished round's overall accuracy and start a new round (called when the next task begins)."""
        accuracy = self.metrics().get("routing_accuracy")
        if accuracy is not None:
            self.history.append(accuracy)
        self.counts = {}

    def rounds(self) -> list[float]:
        """Overall routing accuracy of every round so far, the current one last."""
        current = self.metrics().get("routing_accuracy")
        return self.history + ([current] if current is not None else [])

    def add(self, routes: torch.Tensor) -> None:
        """Routes [B] of one predicted batch of the task being evaluated."""
        self.pending.append(routes.detach().cpu())

    def close_task(self, task_name: str, task_index: int, keep: bool = True, sum_over_processes: SumOverProcesses = local_sum) -> None:
        """Score the pending routes against the task's index, summed over the processes that evaluated shards of
        it (keep=False: drop them). No entry when no process routed an example of the task."""
        routes = torch.cat(self.pending) if self.pending else torch.zeros(0, dtype=torch.long)
        self.pending = []
        # every process takes part, even one whose shard was empty or that does not keep the routes
        correct, total = sum_over_processes([int((routes == task_index).sum()), len(routes)])
        if keep and total:
            self.counts[task_name] = [correct, total]

    def metrics(self) -> dict[str, object]:
        """Routing accuracy of the last evaluation round, overall and per task."""
        if not self.counts:
            return {}
        correct = sum(count[0] for count in self.counts.values())
        total = sum(count[1] for count in self.counts.values())
        return {
            "routing_accuracy": correct / total if total else None,
            "routing_accuracy_per_task": {name: c / n if n else None for name, (c, n) in self.counts.items()},
        }
