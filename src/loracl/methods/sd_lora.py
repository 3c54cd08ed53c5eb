"""sd_lora: earlier tasks' LoRA directions frozen and normalised, with learnable magnitudes that keep training
on every new task (SD-LoRA, Wu et al., ICLR 2025; baselines.md Part 4).

    Delta W = sum_{i<t} alpha_i B_i A_i / n_i + alpha_t B_t A_t
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from loracl.adapters.baseline_lora import MagnitudeLoraLayer
from loracl.backbones.classifier import ContinualClassifier
from loracl.config import Float
from loracl.data.stream import Task
from loracl.methods.base import LoraMethod, MethodOptions
from loracl.methods.routing import RoutedBranchOptions
from loracl.seeding import private_rng

MAGNITUDES_MODULE = "sd_lora_magnitudes"


class SdLoraOptions(MethodOptions, RoutedBranchOptions):
    """Defaults follow the official code: rank 10, scale 1, magnitudes 0.8, factor-norm, magnitudes reset."""

    rank: int = Field(default=10, ge=1)
    # SD-LoRA-RR: rank of task t's branch = rank_schedule[min(t, len - 1)]; the official code's (commented-out)
    # RR schedule is [10, 10, 10, 10, 8, 8, 8, 8, 6]. None: `rank` for every task
    rank_schedule: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    target_modules: str | list[str] = "auto"  # auto: query and value projections, as the official code
    init: Literal["kaiming", "gaussian"] = "kaiming"
    magnitude_init: Float = 0.8
    norm: Literal["factor", "product"] = "factor"  # code: ||B|| ||A||; paper: ||B A||
    reset_magnitudes: bool = True  # code: old magnitudes back to magnitude_init at every task start


class SdLora(LoraMethod):
    """One scalar magnitude per task shared by all adapted layers; all magnitudes train, old directions do not."""

    name = "sd_lora"
    description = "frozen normalised directions of earlier LoRAs, learnable magnitudes (peer baseline)"
    Options: ClassVar[type[MethodOptions]] = SdLoraOptions
    options: SdLoraOptions

    def attach(self, model: ContinualClassifier) -> None:
        # Registered on the model so state_dict, checkpoints and trainable_parameters see them.
        self.magnitudes = nn.ParameterDict()
        model.add_module(MAGNITUDES_MODULE, self.magnitudes)
        super().attach(model)

    def make_layer(self, module: nn.Module, name: str) -> MagnitudeLoraLayer:
        return MagnitudeLoraLayer(module, name, self.magnitude, self.options.norm)

    def magnitude(self, branch_name: str) -> torch.Tensor:
        return self.magnitudes[branch_name]

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.freeze_branches()
        if self.options.reset_magnitudes:
            with torch.no_grad():
                for magnitude in self.magnitudes.values():
                    magnitude.fill_(self.options.magnitude_init)
        branch_name = f"task_{task.index}"
        reference = next(iter(self.layers.values())).base_layer.weight
        self.magnitudes[branch_name] = nn.Parameter(
            torch.tensor(self.options.magnitude_init, dtype=reference.dtype, device=reference.device)
        )
        with private_rng(self.context.seed, task.index):
            rank = self.rank_for_task(task.index)
            for layer in self.layers.values():
                layer.add_branch(branch_name, rank, float(rank), init=self.options.init)
                layer.unnormalized_branch = branch_name  # the branch in training is not normalised (code)

    def rank_for_task(self, task_index: int) -> int:
        """The branch rank of a task: `rank`, or the RR schedule's entry (its last entry for later tasks)."""
        schedule = self.options.rank_schedule
        return self.options.rank if schedule is None else schedule[min(task_index, len(schedule) - 1)]

    def magnitude_values(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in self.magnitudes.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"magnitudes": self.magnitude_values()}

    def task_metrics(self) -> dict[str, Any]:
        return {**super().task_metrics(), "magnitudes": self.magnitude_values()}
