"""inc_lora: a fresh LoRA pair per task, earlier pairs frozen, all summed at test time."""

from __future__ import annotations

from typing import ClassVar

from loracl.data.stream import Task
from loracl.methods.base import LoraMethod, MethodOptions, RoutedLoraOptions


class IncLora(LoraMethod):
    """baselines.md 2.1: O-LoRA with both regularisers off; task-agnostic inference with every pair summed."""

    name = "inc_lora"
    description = "a fresh LoRA per task, earlier ones frozen, all summed"
    Options: ClassVar[type[MethodOptions]] = RoutedLoraOptions

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.freeze_branches()
        self.add_branches(f"task_{task.index}", seed_offset=task.index)
