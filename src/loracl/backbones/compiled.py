"""train.compile: the backbone's transformer blocks, adapters inside them included, run through torch.compile.

Each block keeps its object, names and parameters (checkpoints, injection and block hooks see the same model); only
its call changes. A call runs eagerly, as without the switch, whenever compiled code could miss or misplace something:
a hook on the block or on a module inside it (covariance passes, block read-outs: dynamo does not guard on hooks
added after compiling), or a key/value cache among its arguments (generation, whose cache grows every step). Every
other call goes to one compiled function shared by all blocks of a type; adapters switched on or off, train and eval
mode, new task branches and new shapes make dynamo recompile (or, past its recompile limit, run eagerly): the
results stay those of the eager model, only the speed changes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from loracl.backbones.base import Backbone
from loracl.errors import ConfigError, LoraclError

RECOMPILE_LIMIT = 128  # compiled variants kept per function before dynamo runs new ones eagerly


def _forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward without its hooks (compiled; called only when it has none)."""
    return module.forward(*args, **kwargs)


@functools.cache
def _compiled_forward(backend: str) -> Callable[..., Any]:
    """One compiled `_forward` per backend, so blocks of one type share their compiled graphs."""
    # inductor draws dropout masks from its own generator unless told to call torch's: the adapters' dropout would
    # then differ from the eager run's for the same seed
    options = {"fallback_random": True} if backend == "inductor" else None
    return torch.compile(_forward, backend=backend, options=options)


def _has_hooks(module: nn.Module) -> bool:
    """Whether a forward or backward hook is set on the module, a module inside it, or every module (global)."""
    if (
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    ):
        return True
    return any(
        inner._forward_hooks or inner._forward_pre_hooks or inner._backward_hooks or inner._backward_pre_hooks
        for inner in module.modules()
    )


def _holds_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a Hugging Face key/value cache is among a call's arguments."""
    from transformers.cache_utils import Cache

    return any(isinstance(value, Cache) for value in (*args, *kwargs.values()))


class CompiledCall:
    """A block's `__call__` under train.compile: the compiled forward, or the eager call with hooks or a cache."""

    def __init__(self, module: nn.Module, compiled: Callable[..., Any]) -> None:
        self.module = module
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if _has_hooks(module) or _holds_cache(args, kwargs):
            return module._call_impl(*args, **kwargs)
        return self.compiled(module, *args, **kwargs)


def check_compile(backend: str, device: torch.device) -> None:
    """Raise ConfigError in one line when train.compile cannot run here with this backend."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"train.compile: torch.compile is not supported on this platform with torch {torch.__version__}; set train.compile: false")
    if backend == "inductor" and device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # torch's InvalidCxxCompiler, or whatever a broken toolchain raises
            raise ConfigError(
                "train.compile_backend inductor on the CPU needs a C++ compiler (g++, or $CXX) and none was found;"
                " install one or set train.compile_backend: aot_eager"
            ) from None


def compile_blocks(backbone: Backbone, backend: str, device: torch.device) -> int:
    """Route each transformer block of the backbone (the whole model, where it has no block stack) through
    torch.compile; returns how many modules now compile."""
    check_compile(backend, device)
    try:
        regions: list[nn.Module] = list(backbone.blocks())
    except LoraclError:  # no block stack (a convolutional model): the whole model is one region
        regions = [backbone.model]
    # each task's adapter layout is new to dynamo (about three graphs: first block, later blocks, evaluation); its
    # default limit of eight per function would leave everything after the third task eager. The limit is dynamo's
    # process-wide setting (renamed from cache_size_limit in torch 2.7), raised, never lowered, and only here.
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(getattr(config, limit_name), RECOMPILE_LIMIT))
    compiled = _compiled_forward(backend)
    for region in regions:
        region._compiled_call_impl = CompiledCall(region, compiled)  # what nn.Module.compile sets; __call__ uses it
    return len(regions)


__all__ = ["CompiledCall", "check_compile", "compile_blocks"]
