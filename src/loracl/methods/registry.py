"""Method registry: a method is one module in loracl.methods that defines a Method subclass."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loracl.errors import ConfigError

if TYPE_CHECKING:
    from loracl.methods.base import Method, MethodContext, MethodOptions

# registry name -> module under loracl.methods holding a class with that `name`
METHOD_MODULES: dict[str, str] = {
    "seq_lora": "seq_lora",
    "inc_lora": "inc_lora",
    "joint": "joint",
    "probe": "probe",
    "o_lora": "o_lora",
    "inflora": "inflora",
    "sd_lora": "sd_lora",
    "fm_lora": "fm_lora",
    "lorac_ipc": "lorac_ipc",
    "oa_adapter": "oa_adapter",
    "metalora": "metalora",
    "icm_fusion": "icm_fusion",
    "zero_shot": "zero_shot",
}


def available_methods() -> list[str]:
    return sorted(METHOD_MODULES)


def method_class(name: str) -> type[Method]:
    """The Method subclass registered under `name`; a ConfigError naming it otherwise."""
    if not isinstance(name, str) or name not in METHOD_MODULES:
        raise ConfigError(f"unknown method {name!r}: available methods are {', '.join(available_methods())}")
    module = importlib.import_module(f"loracl.methods.{METHOD_MODULES[name]}")
    from loracl.methods.base import Method

    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Method) and getattr(value, "name", None) == name:
            return value
    raise RuntimeError(f"module loracl.methods.{METHOD_MODULES[name]} defines no Method named {name!r}")


def method_options_class(name: str) -> type[MethodOptions]:
    return method_class(name).Options


def create_method(name: str, options: dict[str, Any] | MethodOptions, context: MethodContext) -> Method:
    """Instantiate a method from its name, its validated (or raw) options and the run context."""
    cls = method_class(name)
    if isinstance(options, dict):
        options = cls.Options.model_validate(options)
    return cls(options, context)
