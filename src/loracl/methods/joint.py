"""joint: one LoRA trained once on all tasks' data together (the non-continual upper bound)."""

from __future__ import annotations

from loracl.data.stream import Task
from loracl.methods.base import LoraMethod


class JointLora(LoraMethod):
    """The engine merges every task into one training set; the accuracy matrix has a single row."""

    name = "joint"
    description = "one LoRA on all tasks' data at once (upper bound, not continual)"
    trains_jointly = True

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if not any(layer.branches for layer in self.layers.values()):
            self.add_branches("default", seed_offset=0)
