"""Task adapters to fuse: reading them (PEFT folders or one task's branch of a loracl run) and checking they fit.

An adapter is `dict[module name, LoraPair]` (loracl.adapters.peft_io). Fusion needs every adapter to sit on the
same base model, on the same modules, with the same ranks and shapes; anything else is refused naming the mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracl.adapters.peft_io import LoraPair, read_peft_adapter
from loracl.errors import LoraclError


@dataclass
class TaskAdapter:
    """One task's LoRA with where it came from and the base model it was trained on (None: unknown)."""

    name: str
    pairs: dict[str, LoraPair]
    base_model: str | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # optional classifier rows (loracl runs)
    # a loracl run on a model with split fused projections: {fused module: [(part, rows)]}; the pairs then name
    # the parts (fused per part, folded into the fused layer only when written as a PEFT folder)
    layouts: dict[str, list] = field(default_factory=dict)


def read_adapter(folder: str | Path, name: str | None = None) -> TaskAdapter:
    """A PEFT LoRA folder as a TaskAdapter."""
    config, pairs = read_peft_adapter(folder)
    return TaskAdapter(name or Path(folder).name, pairs, config.get("base_model_name_or_path"))


def read_run_branch(run_dir: str | Path, task: int) -> TaskAdapter:
    """Task `task`'s own LoRA branch (`task_<k>`, as inc_lora, inflora, sd_lora and icm_fusion keep them) from a
    loracl run, with the scale the method serves it at."""
    from loracl.engine.export import read_run_task_lora

    pairs, record = read_run_task_lora(run_dir, task)
    return TaskAdapter(f"{Path(run_dir).name}/task_{task}", pairs, record.get("backbone_path"), layouts=record.get("fused_layouts", {}))


def check_compatible(adapters: list[TaskAdapter]) -> None:
    """Refuse adapters that differ in base model, modules, ranks or shapes, naming the first mismatch."""
    if not adapters:
        raise LoraclError("no adapters to fuse")
    first = adapters[0]
    for other in adapters[1:]:
        if first.base_model and other.base_model and first.base_model != other.base_model:
            raise LoraclError(
                f"adapters were trained on different base models: `{first.name}` on {first.base_model}, "
                f"`{other.name}` on {other.base_model}"
            )
        missing, extra = sorted(set(first.pairs) - set(other.pairs)), sorted(set(other.pairs) - set(first.pairs))
        if missing or extra:
            raise LoraclError(
                f"adapters target different modules: `{other.name}` lacks {missing[:3]} and adds {extra[:3]} "
                f"compared with `{first.name}`"
            )
        for module, pair in first.pairs.items():
            theirs = other.pairs[module]
            if pair.lora_A.shape[0] != theirs.lora_A.shape[0]:
                raise LoraclError(
                    f"adapters have different ranks on `{module}`: `{first.name}` r={pair.lora_A.shape[0]}, "
                    f"`{other.name}` r={theirs.lora_A.shape[0]}"
                )
            if pair.lora_A.shape != theirs.lora_A.shape or pair.lora_B.shape != theirs.lora_B.shape:
                raise LoraclError(
                    f"adapters have different shapes on `{module}`: `{first.name}` {tuple(pair.lora_B.shape)}x"
                    f"{tuple(pair.lora_A.shape)}, `{other.name}` {tuple(theirs.lora_B.shape)}x{tuple(theirs.lora_A.shape)}"
                )


def delta_weights(pairs: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """scaling * B A per module as a matrix: [d_out, d_in] for a Linear LoRA, [c_out, c_in kh kw] for a conv LoRA
    (lora_A [r, c_in, kh, kw], lora_B [c_out, r, 1, 1]; its merged kernel is this matrix reshaped)."""
    return {
        module: (pair.lora_B.float().flatten(1) @ pair.lora_A.float().flatten(1)) * pair.scaling for module, pair in pairs.items()
    }
