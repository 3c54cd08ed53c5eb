"""seq_lora: one LoRA pair per adapted layer, trained on task after task (the forgetting baseline)."""

from __future__ import annotations

from typing import ClassVar

from loracl.data.stream import Task
from loracl.methods.base import LoraMethod, LoraOptions, MethodOptions
from loracl.methods.routing import RoutedInferenceOptions


class SeqLoraOptions(LoraOptions, RoutedInferenceOptions):
    """LoraOptions plus routed inference (one branch serves every task, so there is no `routed_branches`)."""


class SeqLora(LoraMethod):
    """baselines.md 2.2: the same (A, B) continue training on each task with a fresh optimizer; never re-initialised."""

    name = "seq_lora"
    description = "one LoRA trained on task after task (forgetting baseline)"
    Options: ClassVar[type[MethodOptions]] = SeqLoraOptions

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if not any(layer.branches for layer in self.layers.values()):
            self.add_branches("default", seed_offset=0)
