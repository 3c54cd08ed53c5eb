"""Task models: what turns a backbone's outputs into a task's answer (a growing classifier head, or a language
model's own vocabulary head). Methods adapt `task_model.backbone.model` and never need to know which one it is."""

from loracl.backbones.base import Backbone
from loracl.config import HeadConfig, RunConfig
from loracl.errors import ConfigError
from loracl.task_models.base import TaskModel, scatter_rows
from loracl.task_models.classifier import ClassifierTaskModel


def build_task_model(backbone: Backbone, config: RunConfig, head: HeadConfig) -> TaskModel:
    """The task model the config asks for: a language model's own head for generative backbones (task_model.kind
    auto or language), else a classifier head over pooled features."""
    from loracl.backbones.language import LanguageBackbone

    kind = config.task_model.kind
    if kind == "language" and not isinstance(backbone, LanguageBackbone):
        raise ConfigError(f"task_model.kind: language, but backbone `{backbone.name}` is not a language model")
    if isinstance(backbone, LanguageBackbone) and kind != "classifier":
        from loracl.task_models.language import LanguageTaskModel

        return LanguageTaskModel(backbone, config.task_model)
    return ClassifierTaskModel(backbone, head.metric, head.cosine_scale if head.type == "cosine" else None)


__all__ = ["ClassifierTaskModel", "TaskModel", "build_task_model", "scatter_rows"]
