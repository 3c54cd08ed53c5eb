"""Continual-learning strategies: one file per method, each a Method subclass registered by name."""

from loracl.methods.base import Method, MethodContext, MethodOptions
from loracl.methods.registry import available_methods, create_method, method_class

__all__ = ["Method", "MethodContext", "MethodOptions", "available_methods", "create_method", "method_class"]
