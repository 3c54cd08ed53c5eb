"""Find target modules by PEFT's `target_modules` rules and swap adapter wrappers into a model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from loracl.adapters.base import SUPPORTED_BASE_TYPES, AdapterLayer, names_module, swap_module
from loracl.adapters.fused import FusedProjection
from loracl.errors import LoraclError

# Module names never adapted by "all-linear": classifier outputs and the unused BERT pooler.
# PEFT excludes the output layer only; our backbones end at the encoder, so the pooler is the analogue.
_ALL_LINEAR_EXCLUDED = re.compile(r"(^|\.)(pooler|classifier|lm_head|score|head)(\.|$)")


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT semantics: a string is a full-match regex, a list matches exact names or dotted suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(names_module(name, target) for target in target_modules)


def find_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules to adapt, in model order; a clear error when nothing matches."""
    if isinstance(target_modules, str) and target_modules == "all-linear":
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _ALL_LINEAR_EXCLUDED.search(name)
        ]
    else:
        if not isinstance(target_modules, str) and not target_modules:
            raise LoraclError("target_modules is empty: name at least one module (or use 'all-linear')")
        names = [name for name, module in model.named_modules() if name and _matches(name, target_modules)]
        names = [name for name in names if not isinstance(model.get_submodule(name), AdapterLayer)]
    # a pattern matching a split projection and its parts (`.*qkv.*`) means the parts
    names = [
        name
        for name in names
        if not isinstance(model.get_submodule(name), FusedProjection)
        or not all(f"{name}.{part}" in names for part, _ in model.get_submodule(name).part_sizes)
    ]
    wrong_type = [name for name in names if not isinstance(model.get_submodule(name), SUPPORTED_BASE_TYPES)]
    fused = [name for name in wrong_type if isinstance(model.get_submodule(name), FusedProjection)]
    if fused:
        parts = [part for part, _ in model.get_submodule(fused[0]).part_sizes]
        raise LoraclError(
            f"target_modules matched `{fused[0]}`, a fused projection split into parts {parts}: target the parts "
            f"(e.g. '{fused[0].rsplit('.', 1)[-1]}.{parts[0]}' or '{parts[0]}'), or set backbone.split_fused: off"
        )
    if wrong_type:
        kind = type(model.get_submodule(wrong_type[0])).__name__
        raise LoraclError(
            f"target_modules matched `{wrong_type[0]}`, a {kind}; only nn.Linear and nn.Conv2d can be adapted"
        )
    if not names:
        examples = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, SUPPORTED_BASE_TYPES)}
        )
        raise LoraclError(f"target_modules {target_modules!r} matched no module; adaptable names include {examples[:12]}")
    return names


def inject_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str],
    factory: Callable[[nn.Module, str], AdapterLayer],
) -> dict[str, AdapterLayer]:
    """Replace each target module with factory(module, name); returns the wrappers by module name."""
    wrappers: dict[str, AdapterLayer] = {}
    for name in find_target_modules(model, target_modules):
        wrappers[name] = factory(model.get_submodule(name), name)
        swap_module(model, name, wrappers[name])
    return wrappers


def adapter_layers(model: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> dict[str, AdapterLayer]:
    """All adapter wrappers of a given kind in the model, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, kind)}


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter wrapper's delta into its base weight."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every adapter wrapper in `model` serves its frozen base layer alone for the duration (PEFT's
    `disable_adapter()`); each layer's own flag is restored afterwards."""
    layers = list(adapter_layers(model).values())
    saved = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, saved):
            layer.disabled = flag
