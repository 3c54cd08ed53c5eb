"""The classifier task model: backbone features -> a growing linear (or cosine) head, or class prototypes.

It owns everything that only has meaning for a class head: head rows per task (old rows frozen), the
cross-entropy scope, prototypes, per-class Gaussians and the head re-alignment (head.align)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loracl.backbones.alignment import ClassGaussians, realign_head
from loracl.backbones.base import Backbone
from loracl.backbones.heads import LinearHead, PrototypeHead, head_rows_generator, mask_to_classes
from loracl.config import HeadConfig
from loracl.data.stream import Task
from loracl.seeding import derived_generator
from loracl.task_models.base import TaskModel

if TYPE_CHECKING:
    from loracl.methods.base import MethodContext


class ClassifierTaskModel(TaskModel):
    """Backbone features -> linear logits (training signal) or prototype scores (nearest class mean)."""

    kind: ClassVar[str] = "classifier"
    prediction_fill: ClassVar[float] = float("-inf")
    has_class_head: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, prototype_metric: str = "cosine", cosine_scale: float | None = None) -> None:
        super().__init__(backbone)
        self.head = LinearHead(backbone.hidden_size, cosine_scale)
        self.prototypes = PrototypeHead(backbone.hidden_size, prototype_metric)
        self.class_gaussians: ClassGaussians | None = None
        self.head_config = HeadConfig()

    def prepare(self, context: MethodContext) -> None:
        """Take the run's head settings; create what they need from the start (head.align's per-class Gaussians,
        saved in state)."""
        self.head_config = context.head
        if context.head.align and self.class_gaussians is None:
            device = next(self.backbone.parameters()).device
            self.class_gaussians = ClassGaussians(self.hidden_size, context.head.align_centroids, device=device)

    # ----- per-task structure ------------------------------------------------------------------------
    def begin_task(self, task: Task, context: MethodContext) -> None:
        """Grow the head for the task's new classes and freeze earlier head rows (head.freeze_old), except the rows
        of classes this task shares with an earlier one (domain-incremental streams, shared label names)."""
        if context.head.freeze_old:
            self.head.freeze_all()
            self.head.unfreeze_classes(task.class_ids)  # classes this task shares with earlier ones still learn
        self.head.add_classes(task.class_ids, generator=head_rows_generator(context.seed, task.index))

    def restore_task(self, task: Task, context: MethodContext, from_base_session: bool = False) -> None:
        if from_base_session:  # a base session only grew the head
            self.head.add_classes(task.class_ids)
        else:
            self.begin_task(task, context)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    # ----- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:  # type: ignore[override]
        """Linear-head logits [B, classes seen]; takes a batch or, as before, its inputs alone."""
        inputs = batch["inputs"] if "inputs" in batch else batch
        return self.head(self.features(inputs))

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], task: Task | None, context: MethodContext) -> torch.Tensor:
        """Cross-entropy over the current task's classes (head.loss_scope: current_task) or all seen."""
        labels = batch["labels"]
        if context.head.loss_scope == "current_task" and task is not None:
            columns = torch.tensor(task.class_ids, device=outputs.device)
            remap = torch.full((outputs.shape[1],), -1, dtype=torch.long, device=outputs.device)
            remap[columns] = torch.arange(len(columns), device=outputs.device)
            return F.cross_entropy(outputs[:, columns], remap[labels])
        return F.cross_entropy(outputs, labels)

    # ----- statistics after a task ---------------------------------------------------------------------
    def end_task(
        self,
        task: Task,
        loader: Iterable[dict[str, Any]],
        context: MethodContext,
        seen_tasks: list[Task],
        features: Callable[[dict[str, Any]], torch.Tensor],
    ) -> None:
        """Prototypes of the task's classes (prototype head), or the task's class Gaussians and, from the second
        task on, a re-alignment of the whole head on every seen class (head.align)."""
        if context.head.type == "prototype":
            self.update_prototypes(task, self.task_features(loader, features))
        if self.class_gaussians is not None:
            task_features, labels = self.task_features(loader, features)
            self.class_gaussians.append_features(task_features, labels, task.class_ids, context.seed)
            if len(seen_tasks) > 1:
                self.align_head(task, context)

    def absorb_base_session(
        self, task: Task, loader: Iterable[dict[str, Any]], context: MethodContext, features: Callable[[dict[str, Any]], torch.Tensor]
    ) -> None:
        """Statistics of a base session's task (no re-alignment: it is the first task)."""
        if context.head.type == "prototype":
            self.update_prototypes(task, self.task_features(loader, features))
        if self.class_gaussians is not None:
            task_features, labels = self.task_features(loader, features)
            self.class_gaussians.append_features(task_features, labels, task.class_ids, context.seed)

    @torch.no_grad()
    def task_features(
        self, loader: Iterable[dict[str, Any]], features: Callable[[dict[str, Any]], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [n, H] (eval mode, CPU fp32) and labels [n] of a whole loader."""
        was_training = self.training
        self.eval()
        collected, labels = [], []
        for batch in loader:
            collected.append(features(batch).float().cpu())
            labels.append(batch["labels"].cpu())
        self.train(was_training)
        if not collected:  # an empty loader: no statistics to take
            return torch.zeros(0, self.hidden_size), torch.zeros(0, dtype=torch.long)
        return torch.cat(collected), torch.cat(labels)

    def update_prototypes(self, task: Task, features_and_labels: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Class means of the task's training features under the current model."""
        task_features, labels = features_and_labels
        device = self.prototypes.sums.device
        self.prototypes.reset_classes(task.class_ids)
        if len(labels):
            self.prototypes.accumulate(task_features.to(device), labels.to(device))

    def align_head(self, task: Task, context: MethodContext) -> None:
        """head.align: re-train every head row on pseudo-features of all seen classes (backbones/alignment.py)."""
        assert self.class_gaussians is not None
        head = context.head
        realign_head(
            self.head,
            self.class_gaussians,
            epochs=head.align_epochs,
            lr=head.align_lr,
            momentum=0.9,  # LoRAC-IPC's TAP values
            batch_size=320,
            samples_per_cluster=head.align_samples_per_cluster,
            iterations_per_epoch=None,  # one pass over the samples
            generator=derived_generator(context.seed, task.index),
        )

    # ----- inference ----------------------------------------------------------------------------------
    @property
    def uses_prototypes(self) -> bool:
        return self.head_config.type == "prototype"

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Scores [B, C_seen] of features: the prototype head's (head.type prototype) or the linear head's."""
        return self.prototypes(features) if self.uses_prototypes else self.head(features)

    def predict(self, batch: dict[str, Any], features: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores [B, C_seen] of the adapted features (or of `features` when given)."""
        return self.scores(self.features(batch["inputs"]) if features is None else features)

    def restrict(self, predictions: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
        return mask_to_classes(predictions, class_ids)

    def example_scores(self, predictions: torch.Tensor, batch: dict[str, Any], task: Task, scenario: str) -> dict[str, torch.Tensor]:
        scores = predictions.float()
        if scenario == "task_incremental":
            scores = mask_to_classes(scores, task.class_ids)
        return {"accuracy": (scores.argmax(dim=1) == batch["labels"]).float()}

    def known_classes(self) -> set[int]:
        if self.uses_prototypes:
            return set(torch.nonzero(self.prototypes.counts > 0).flatten().tolist())
        return set(range(self.head.num_classes))
