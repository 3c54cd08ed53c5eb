"""zero_shot: the pre-trained language model as it is, no adapter and no training (the floor of an LM stream)."""

from __future__ import annotations

from loracl.errors import ConfigError
from loracl.methods.base import Method
from loracl.task_models.base import TaskModel


class ZeroShot(Method):
    """Nothing to inject or train: every task is answered by the untouched model from its instruction."""

    name = "zero_shot"
    description = "the untrained language model answering from the instruction (floor)"
    task_models = ("language",)

    def check_task_model(self, model: TaskModel) -> None:
        if model.has_class_head:
            raise ConfigError(
                "method `zero_shot`: a classifier head starts untrained, so zero-shot has no meaning there;"
                " use `probe` as the classifier floor"
            )
