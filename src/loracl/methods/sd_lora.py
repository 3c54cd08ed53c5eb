"""sd_lora: earlier tasks' LoRA directions frozen and normalised, with learnable magnitudes that keep training
on every new task (SD-LoRA, Wu et al., ICLR 2025; baselines.md Part 4).

    Delta W = sum_{i<t} alpha_i B_i A_i / n_i + alpha_t B_t A_t

SD-LoRA-KD (`kd_threshold`): after each task t > 0, in each adapted layer, the new direction D_t is fitted by
least squares on the earlier ones, D_t ~ sum_i c_i D_i; when the squared residual is below the threshold the new
branch is zeroed and its part goes to the earlier directions' per-layer assimilated magnitudes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from loracl.adapters.baseline_lora import MagnitudeLoraLayer
from loracl.config import Float
from loracl.data.stream import Task
from loracl.methods.base import LoraMethod, MethodOptions
from loracl.methods.routing import RoutedBranchOptions
from loracl.seeding import private_rng
from loracl.task_models.base import TaskModel

MAGNITUDES_MODULE = "sd_lora_magnitudes"


class SdLoraOptions(MethodOptions, RoutedBranchOptions):
    """Defaults follow the official code: rank 10, scale 1, magnitudes 0.8, factor-norm, magnitudes reset."""

    rank: int = Field(default=10, ge=1, description="Rank r of each task's branch. Source: official code.")
    rank_schedule: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        min_length=1,
        description="SD-LoRA-RR: the rank of task t's branch is rank_schedule[min(t, len − 1)] (the list's last entry for "
        "later tasks); null = `rank` for every task. The official repository's RR schedule, left commented out in "
        "`models/sdlora.py`, is [10, 10, 10, 10, 8, 8, 8, 8, 6]. Source: official code (commented out there).",
    )
    target_modules: str | list[str] = Field(
        default="auto",
        description="Which modules get adapters, with PEFT's semantics; `auto` = the query and value projections (or the q "
        "and v parts of a fused `qkv` split by `backbone.split_fused`, as the code's slices). Source: official code.",
    )
    init: Literal["kaiming", "gaussian"] = Field(
        default="kaiming",
        description="Initialisation of the down-projection A: `kaiming` = Kaiming-uniform, `gaussian` = N(0, 1/r²); B "
        "starts at zero. Source: official code.",
    )
    magnitude_init: Float = Field(
        default=0.8, description="Initial value of every magnitude α_i (scalars shared by all adapted layers). Source: official code."
    )
    norm: Literal["factor", "product"] = Field(
        default="factor",
        description="How a finished direction B_i A_i is normalised: `factor` = by n_i = ‖B_i‖_F ‖A_i‖_F (the code), "
        "`product` = by n_i = ‖B_i A_i‖_F (the paper). Source: official code (`factor`); paper (`product`).",
    )
    reset_magnitudes: bool = Field(
        default=True,
        description="True: the old magnitudes go back to `magnitude_init` at every task start (the code rebuilds the "
        "backbone); false: they carry over (the paper). Source: official code (true); paper (false).",
    )
    train_magnitudes: bool = Field(
        default=True,
        description="Ablation switch: false keeps every magnitude at `magnitude_init` (frozen), so only the new direction "
        "trains; isolates the learnable magnitudes that are SD-LoRA's mechanism. "
        "Source: our design (not in the paper or code).",
    )
    kd_threshold: Float | None = Field(
        default=None,
        gt=0.0,
        description="SD-LoRA-KD: after each task t > 0, per adapted layer, the new direction D_t = B_t A_t / n_t is fitted by "
        "least squares on the earlier non-zero directions; if the squared residual is below this threshold, B_t and A_t "
        "are zeroed and the fit goes to the earlier directions' per-layer assimilated magnitudes β_i (the layer then uses "
        "α_i + β_i). null = off; LibContinual's SD-LoRA-KD configs use 9e-4. Source: neighbouring code (LibContinual's "
        "reproduction).",
    )
    kd_update: Literal["direction", "function"] = Field(
        default="direction",
        description="How an absorbed direction is assimilated: `direction` = β_i += c_i, the fit's coefficients "
        "(LibContinual); `function` = β_i += α_t·c_i, so the layer's update (with every direction normalised, as the next "
        "task sees it) is kept up to the residual. Needs `kd_threshold`. Source: neighbouring code (`direction`, "
        "LibContinual); `function` is our design (not in the paper or code).",
    )
    kd_residual: Literal["absolute", "relative"] = Field(
        default="absolute",
        description="What `kd_threshold` bounds: `absolute` = ‖fit − D_t‖²_F (LibContinual); `relative` = that divided by "
        "‖D_t‖²_F, the share of the new direction the earlier ones leave unexplained (scale-free: with the code's factor "
        "norm ‖D_t‖ can be anywhere in (0, 1], so an absolute residual is small whenever D_t itself is). Needs "
        "`kd_threshold`. Source: neighbouring code (`absolute`, LibContinual); `relative` is our design (not in the paper "
        "or code).",
    )

    inert_defaults: ClassVar[dict[str, Any]] = {"train_magnitudes": True, "kd_threshold": None, "kd_update": "direction", "kd_residual": "absolute"}

    @model_validator(mode="after")
    def _kd_options_need_kd(self) -> SdLoraOptions:
        for key, default in (("kd_update", "direction"), ("kd_residual", "absolute")):
            if getattr(self, key) != default and self.kd_threshold is None:
                raise ValueError(f"{key} acts on SD-LoRA-KD's absorption: it needs kd_threshold")
        return self


class SdLora(LoraMethod):
    """One scalar magnitude per task shared by all adapted layers; all magnitudes train, old directions do not."""

    name = "sd_lora"
    description = "frozen normalised directions of earlier LoRAs, learnable magnitudes (peer baseline)"
    Options: ClassVar[type[MethodOptions]] = SdLoraOptions
    options: SdLoraOptions

    def attach(self, model: TaskModel) -> None:
        # Registered on the model so state_dict, checkpoints and trainable_parameters see them.
        self.magnitudes = nn.ParameterDict()
        self.absorbed: dict[str, list[str]] = {}  # SD-LoRA-KD: branch -> layers that absorbed it
        self.kd_residuals: dict[str, list[float]] = {}  # SD-LoRA-KD: branch -> [min, max] squared residual
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
        if not self.options.train_magnitudes:
            for magnitude in self.magnitudes.values():
                magnitude.requires_grad_(False)
        with private_rng(self.context.seed, task.index):
            rank = self.rank_for_task(task.index)
            for layer in self.layers.values():
                layer.add_branch(branch_name, rank, float(rank), init=self.options.init)
                layer.unnormalized_branch = branch_name  # the branch in training is not normalised (code)

    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        if self.options.kd_threshold is not None and task.index > 0:
            self.absorb_directions(f"task_{task.index}")
        super().end_task(task, train_loader)  # class statistics under the absorbed model, which serves from now

    @torch.no_grad()
    def absorb_directions(self, branch_name: str) -> list[str]:
        """SD-LoRA-KD: in every layer whose new direction the earlier (non-zero) ones explain by least squares
        with a squared residual (absolute, or relative to the direction's own) below kd_threshold, zero the new branch and add the fit to the earlier branches'
        assimilated magnitudes; returns the absorbing layers' names."""
        absorbed, residuals = [], []
        new_magnitude = float(self.magnitudes[branch_name])
        for name, layer in self.layers.items():
            earlier = [other for other in layer.branches if other != branch_name and layer.frozen_norm(other) > 0]
            if not earlier or layer.frozen_norm(branch_name) == 0:  # nothing to fit with, or nothing learned
                continue
            # float64 least squares over flattened directions: [d_out * d_in, k] c = [d_out * d_in]
            basis = torch.stack([layer.direction(other).flatten().double().cpu() for other in earlier], dim=1)
            target = layer.direction(branch_name).flatten().double().cpu()
            fit = torch.linalg.lstsq(basis, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)  # gelsd: CPU only
            residual = float((basis @ fit - target).square().sum())
            if self.options.kd_residual == "relative":
                residual /= float(target.square().sum())
            residuals.append(residual)
            if residual >= self.options.kd_threshold:
                continue
            scale = new_magnitude if self.options.kd_update == "function" else 1.0
            for other, coefficient in zip(earlier, fit.tolist()):
                layer.assimilated[other] = layer.assimilated.get(other, 0.0) + scale * coefficient
            branch = layer.branches[branch_name]
            branch.lora_A.zero_()
            branch.lora_B.zero_()
            absorbed.append(name)
        self.absorbed[branch_name] = absorbed
        if residuals:  # how far the threshold was: the smallest and largest squared residual over the layers
            self.kd_residuals[branch_name] = [min(residuals), max(residuals)]
        return absorbed

    def rank_for_task(self, task_index: int) -> int:
        """The branch rank of a task: `rank`, or the RR schedule's entry (its last entry for later tasks)."""
        schedule = self.options.rank_schedule
        return self.options.rank if schedule is None else schedule[min(task_index, len(schedule) - 1)]

    def magnitude_values(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in self.magnitudes.items()}

    def assimilated_values(self) -> dict[str, dict[str, float]]:
        """SD-LoRA-KD's per-layer magnitude offsets {module: {branch: beta}} (only non-empty layers)."""
        return {name: dict(layer.assimilated) for name, layer in self.layers.items() if layer.assimilated}

    def extra_state(self) -> dict[str, Any]:
        return {
            "magnitudes": self.magnitude_values(),
            "assimilated": self.assimilated_values(),
            "absorbed": self.absorbed,
            "kd_residuals": self.kd_residuals,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, values in state.get("assimilated", {}).items():
            self.layers[name].assimilated = {branch: float(value) for branch, value in values.items()}
        self.absorbed = {branch: list(names) for branch, names in state.get("absorbed", {}).items()}
        self.kd_residuals = {branch: list(pair) for branch, pair in state.get("kd_residuals", {}).items()}

    def task_metrics(self) -> dict[str, Any]:
        metrics = {**super().task_metrics(), "magnitudes": self.magnitude_values()}
        if self.options.kd_threshold is not None:  # per task: the layers whose new direction was absorbed
            metrics["kd_absorbed_layers"] = {branch: len(names) for branch, names in self.absorbed.items()}
            metrics["kd_assimilated"] = self.assimilated_values()
            metrics["kd_residual_range"] = self.kd_residuals
        return metrics
