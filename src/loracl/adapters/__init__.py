"""Layer-level adapters: how one frozen Linear/Conv2d gets a trainable delta. No knowledge of tasks."""

from loracl.adapters.base import AdapterLayer
from loracl.adapters.fused import FusedProjection, join_fused_projections, split_fused_projections
from loracl.adapters.inject import adapter_layers, adapters_disabled, find_target_modules, inject_adapters, merge_adapters, unmerge_adapters
from loracl.adapters.lora import LoraBranch, LoraLayer

__all__ = [
    "AdapterLayer",
    "FusedProjection",
    "LoraBranch",
    "LoraLayer",
    "adapter_layers",
    "adapters_disabled",
    "find_target_modules",
    "inject_adapters",
    "join_fused_projections",
    "merge_adapters",
    "split_fused_projections",
    "unmerge_adapters",
]
