"""Backbones: a frozen Hugging Face model plus its preprocessing and pooling, and the classifier heads."""

from loracl.backbones.base import Backbone
from loracl.backbones.heads import LinearHead, PrototypeHead
from loracl.backbones.registry import BACKBONES, load_backbone

__all__ = ["BACKBONES", "Backbone", "LinearHead", "PrototypeHead", "load_backbone"]
