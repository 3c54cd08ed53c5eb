"""The task-model contract: per-task structure, the training loss, predictions and how they are scored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from loracl.adapters.base import AdapterLayer
from loracl.backbones.base import Backbone
from loracl.data.stream import Split, Task

if TYPE_CHECKING:
    from loracl.methods.base import MethodContext


class TaskModel(nn.Module):
    """A frozen backbone plus whatever maps its outputs to answers; the engine and methods talk to it only here.

    Predictions are tensors with one row per example, so routed inference can score groups of rows separately and
    put them back together (`scatter_rows`, padding with `prediction_fill`)."""

    kind: ClassVar[str] = ""
    prediction_fill: ClassVar[float] = 0.0
    # what the model has that methods built for a classifier head may ask for; a method refuses the model when not
    has_class_head: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def adaptable(self) -> nn.Module:
        """The Hugging Face module adapters are injected into."""
        return self.backbone.model

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    # ----- data ------------------------------------------------------------------------------------
    def collate(self, split: Split, indices: list[int], task: Task, train: bool) -> dict[str, torch.Tensor]:
        """The model's keyword tensors for examples `indices` of a split (`inputs` of a batch)."""
        return self.backbone.collate([split.inputs[i] for i in indices])

    def check_stream(self, stream: Any) -> None:
        """Raise DataError naming the example if some example cannot be fed to this task model (before training)."""

    # ----- per-task structure ------------------------------------------------------------------------
    def begin_task(self, task: Task, context: MethodContext) -> None:
        """Structure a new task needs before training (e.g. head rows)."""

    def restore_task(self, task: Task, context: MethodContext, from_base_session: bool = False) -> None:
        """A finished task's structure again, before a checkpoint's tensors are loaded."""
        self.begin_task(task, context)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the task model's own head (trained with train.head_lr when they require grad)."""
        return []

    def end_task(
        self, task: Task, loader: Iterable[dict[str, Any]], context: MethodContext, seen_tasks: list[Task], features: Any
    ) -> None:
        """Statistics kept after a task under the model that will serve (features(batch) -> [B, H])."""

    # ----- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:  # type: ignore[override]
        """Training outputs of a batch (what `loss` takes)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], task: Task | None, context: MethodContext) -> torch.Tensor:
        raise NotImplementedError

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features of the inputs [B, H] (routers, statistics, feature-conditioned adapters)."""
        return self.backbone(**inputs)

    def input_pass(self, batch: dict[str, Any]) -> torch.Tensor:
        """Run every adapted layer on a batch without a loss (covariance and statistics passes)."""
        return self.features(batch["inputs"])

    def train_adapters(self) -> TaskModel:
        """Train mode for everything but the frozen backbone's own layers: heads, method modules and the adapter
        layers inside the backbone (their dropout acts, as in PEFT), while the backbone's dropout stays off."""
        self.train()
        self.backbone.eval()
        for module in self.backbone.modules():
            if isinstance(module, AdapterLayer):
                module.train()
        return self

    # ----- inference ----------------------------------------------------------------------------------
    def predict(self, batch: dict[str, Any], features: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions [B, ...] for a batch under the current adapters (`features`: precomputed, classifier only)."""
        raise NotImplementedError

    def restrict(self, predictions: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
        """Predictions limited to some classes (routed or task-incremental scoring); unchanged where meaningless."""
        return predictions

    def example_scores(self, predictions: torch.Tensor, batch: dict[str, Any], task: Task, scenario: str) -> dict[str, torch.Tensor]:
        """Per-example metrics [B] of predictions; `accuracy` (1.0 right, 0.0 wrong) feeds the accuracy matrix."""
        raise NotImplementedError

    def known_classes(self) -> set[int]:
        """Classes the model can already score before their task trains (FWT's a[j-1][j])."""
        return set()


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], size: int, fill: float) -> torch.Tensor:
    """Row groups (rows [n], values [n, ...]) -> one tensor [size, ...]; trailing dims padded with `fill`."""
    width = max(values.shape[1] for _, values in parts) if parts[0][1].dim() > 1 else None
    first = parts[0][1]
    shape = (size,) if width is None else (size, width)
    out = first.new_full(shape, fill)
    for rows, values in parts:
        rows = rows.to(out.device)
        if width is None:
            out[rows] = values
        else:
            out[rows, : values.shape[1]] = values
    return out
