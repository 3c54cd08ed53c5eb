"""Former home of the classifier model; it is the classifier task model now (loracl.task_models.classifier)."""

from loracl.task_models.classifier import ClassifierTaskModel

ContinualClassifier = ClassifierTaskModel  # the name earlier code and notebooks import

__all__ = ["ContinualClassifier"]
