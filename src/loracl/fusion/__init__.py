"""Fuse several task LoRAs into one: ICM-Fusion and the merge baselines behind one `fuse(..., method=...)`.

    from loracl.fusion import fuse, read_adapter
    adapters = [read_adapter(folder) for folder in ("lora_a", "lora_b")]
    fused = fuse(adapters, "ties")                        # write_peft_adapter(fused.adapter, "out", base)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from loracl.adapters.peft_io import LoraPair
from loracl.config import Float, StrictModel, _format_validation_error
from loracl.errors import ConfigError, LoraclError
from loracl.fusion.adapters import TaskAdapter, check_compatible, read_adapter, read_run_branch
from loracl.fusion.host import LoraHost, TaskSupport
from loracl.fusion.icm_fusion import FusionTask, IcmFusion, IcmFusionOptions, IcmFusionResult, adapter_on
from loracl.fusion.merges import PEFT_COMBINATIONS, lorahub, peft_merge, task_arithmetic

FUSION_METHODS = ("icm", *PEFT_COMBINATIONS, "task_arithmetic", "lorahub")
NEEDS_EXAMPLES = ("lorahub",)


class FuseOptions(StrictModel):
    """Knobs of every fusion method; each method reads the ones it uses."""

    weights: list[Float] | None = None  # PEFT types: None -> 1 each for TIES-style, 1/T for weighted sums
    density: Float = Field(default=0.5, gt=0.0, le=1.0)  # TIES / DARE / magnitude prune (spec 8.2 default)
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(default=None, ge=1)
    scaling_coefficient: Float = 0.3  # task arithmetic lambda [D]: Ilharco et al.'s usual value
    budget: int = Field(default=40, ge=1)  # LoRAHub search steps (its default)
    l1_weight: Float = Field(default=0.05, ge=0.0)  # LoRAHub's L1 penalty
    combine: Literal["cat", "factors"] = "cat"  # LoRAHub: exact weighted delta sum [D, spec 7] or its own factor sum
    seed: int = 0
    icm: IcmFusionOptions = Field(default_factory=IcmFusionOptions)


def fuse_options(data: dict[str, Any] | None = None) -> FuseOptions:
    """Validated FuseOptions, a ConfigError naming the offending key otherwise."""
    try:
        return FuseOptions.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "fuse options")) from None


@dataclass
class FusionOutcome:
    adapter: dict[str, LoraPair]
    report: dict[str, Any]
    icm: IcmFusionResult | None = None  # the trained F-VAE, latents and statistics (method icm only)


def fuse(
    adapters: list[TaskAdapter],
    method: str,
    options: FuseOptions | dict[str, Any] | None = None,
    host: LoraHost | None = None,
    supports: list[TaskSupport] | None = None,
    samples: list[list[dict[str, LoraPair]]] | None = None,
) -> FusionOutcome:
    """One fused LoRA from T task adapters; `host` + `supports` (one per adapter) for methods that use examples."""
    options = options if isinstance(options, FuseOptions) else fuse_options(options)
    if method not in FUSION_METHODS:
        raise LoraclError(f"unknown fusion method {method!r}: use one of {', '.join(FUSION_METHODS)}")
    check_compatible(adapters)
    uses_examples = method in NEEDS_EXAMPLES or (method == "icm" and host is not None)
    if uses_examples:
        if host is None or supports is None:
            raise LoraclError(f"fusion method `{method}` needs a base model and a few examples per task")
        if len(supports) != len(adapters):
            raise LoraclError(f"{len(supports)} example sets for {len(adapters)} adapters: give one per adapter")
    # every method starts from (and returns) CPU tensors; ICM and the host move what they compute with
    pairs = [adapter_on(adapter.pairs, torch.device("cpu")) for adapter in adapters]
    icm_result = None
    started = time.perf_counter()
    report: dict[str, Any] = {"method": method, "adapters": [adapter.name for adapter in adapters]}
    if method in PEFT_COMBINATIONS:
        fused = peft_merge(pairs, method, options.weights, options.density, options.majority_sign_method, options.svd_rank)
    elif method == "task_arithmetic":
        fused = task_arithmetic(pairs, options.scaling_coefficient)
    elif method == "lorahub":
        assert host is not None and supports is not None
        fused, weights = lorahub(
            pairs, lambda adapter: host.eval_loss(adapter, supports), options.budget, options.l1_weight,
            combine=options.combine, seed=options.seed,
        )
        report["weights"] = [round(w, 4) for w in weights]
    else:
        if host is None:
            icm = IcmFusion(options.icm, None)  # the data-free mode, or a clear error naming what needs examples
            dummy = [None] * len(adapters)
        else:
            icm, dummy = IcmFusion(options.icm, host), list(supports or [])
        tasks = [
            FusionTask(adapter.name, pairs[i], support, (samples or [[]] * len(adapters))[i])  # type: ignore[arg-type]
            for i, (adapter, support) in enumerate(zip(adapters, dummy))
        ]
        icm_result = icm.fuse(tasks)
        fused = icm_result.adapter
        report.update(icm_result.report)
    if host is not None:
        host.remove()
    report["fusion_s"] = time.perf_counter() - started
    report["fused_rank"] = int(next(iter(fused.values())).lora_A.shape[0])
    return FusionOutcome(fused, report, icm_result)


__all__ = [
    "FUSION_METHODS",
    "FuseOptions",
    "FusionOutcome",
    "LoraHost",
    "TaskAdapter",
    "TaskSupport",
    "check_compatible",
    "fuse",
    "fuse_options",
    "read_adapter",
    "read_run_branch",
]
