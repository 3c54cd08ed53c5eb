"""inflora: LoRA whose down-projection is designed from the task's inputs, away from earlier tasks' input
subspace, so training the up-projection barely touches old tasks (InfLoRA, Liang and Li, CVPR 2024;
baselines.md Part 3).

Naming: PEFT's convention throughout. lora_A is the designed, frozen down-projection (the paper calls it B),
lora_B the trained up-projection (the paper's A).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from loracl.config import Float
from loracl.data.stream import Task
from loracl.errors import LoraclError
from loracl.methods._subspace import (
    SubspaceBasis,
    collect_input_covariances,
    design_down_projection,
    first_basis,
    threshold_for_task,
    update_basis,
)
from loracl.methods.base import KEY_VALUE_NAMES, LoraMethod, MethodOptions
from loracl.methods.routing import RoutedBranchOptions
from loracl.seeding import derived_generator
from loracl.task_models.base import TaskModel

BASIS_PREFIX = "inflora_basis."


class InfLoraOptions(MethodOptions, RoutedBranchOptions):
    """Defaults: the official CIFAR-100 / DomainNet config (rank 10, lamb 0.95, lame 1.0, DualGPM)."""

    rank: int = Field(default=10, ge=1, description="Rank r of each task's branch. Source: official code (CIFAR / ImageNet-R configs).")
    target_modules: str | list[str] = Field(
        default="auto",
        description="Which modules get adapters, with PEFT's semantics; `auto` = the key and value projections (`key`/`value`, "
        "`k_proj`/`v_proj`, or the k and v parts of a fused `qkv` split by `backbone.split_fused`, as the code's slices). "
        "Source: official code.",
    )
    lamb: Float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Energy threshold of the subspace memory at the first task (λ_b; the threshold then rises towards `lame`). "
        "Source: official code (CIFAR-100 config; ImageNet-R uses 0.98).",
    )
    lame: Float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Energy threshold the schedule ε_t = λ_b + (λ_e − λ_b)(t − 1)/T rises towards (λ_e); must be ≥ `lamb`. "
        "Source: official code.",
    )
    basis_update: Literal["dual_gpm", "gpm"] = Field(
        default="dual_gpm",
        description="How the memory of old subspaces is updated after each task: `dual_gpm` stores whichever of M and its "
        "complement M⊥ is smaller; `gpm` = plain GPM, always M (the DomainNet config). Source: official code.",
    )
    design: Literal["cov_proj", "sym", "random"] = Field(
        default="cov_proj",
        description="How the new branch's down-projection A is designed: `cov_proj` = top singular vectors of (I − MMᵀ) C "
        "(the code); `sym` = eigenvectors of (I − MMᵀ) C (I − MMᵀ); `random` = a seeded random A with orthonormal rows / √3 "
        "(the designed A's scale), ignoring the data and the memory (which is still kept): the ablation that isolates "
        "InfLoRA's designed down-projection. Source: official code (`cov_proj`); `sym` and `random` are our design "
        "(not in the paper or code).",
    )
    energy: Literal["code", "gpm"] = Field(
        default="code",
        description="What the energy threshold is applied to: `code` = the squared eigenvalues of the input covariance C "
        "(the code); `gpm` = the eigenvalues, as GPM. Source: official code (`code`); `gpm` is our design (not in the "
        "paper or code).",
    )
    lr_schedule: Literal["cosine", "multistep", "constant"] = Field(
        default="cosine",
        description="Per-epoch learning-rate factor: `cosine` = cos(99π·e / (200·(E − 1))) for epoch e of E (CIFAR / "
        "ImageNet-R configs; ends at about 1.6 % of the learning rate), `multistep` = ×0.1 from epoch index 4 on "
        "(DomainNet), `constant`; with one epoch all three are the same. Source: official code.",
    )

    @model_validator(mode="after")
    def _threshold_rises(self) -> InfLoraOptions:
        if self.lame < self.lamb:
            raise ValueError(f"`lame` ({self.lame}) must be >= `lamb` ({self.lamb})")
        return self


def random_down_projection(width: int, rank: int, seed: int, task_index: int) -> torch.Tensor:
    """A seeded random A [rank, width] with orthonormal rows / sqrt(3), the designed A's scale (ablation)."""
    generator = derived_generator(seed, 500 + task_index)
    gaussian = torch.randn(width, rank, generator=generator)
    return torch.linalg.qr(gaussian).Q.T / 3**0.5  # [rank, width]


class InfLora(LoraMethod):
    """Per task: design A_t = U_r^T / sqrt(3) from the projected input covariance, train only B_t and the head,
    then add the task's input subspace to the (Dual)GPM memory. Branch scale s = 1, no dropout (the code's)."""

    name = "inflora"
    description = "LoRA in a subspace free of earlier tasks' input interference (peer baseline)"
    Options: ClassVar[type[MethodOptions]] = InfLoraOptions
    options: InfLoraOptions

    target_candidates = KEY_VALUE_NAMES  # the code adapts key and value

    def attach(self, model: TaskModel) -> None:
        super().attach(model)
        conv = [name for name, layer in self.layers.items() if layer.is_conv]
        if conv:
            raise LoraclError(f"inflora adapts linear layers only; target `{conv[0]}` is a Conv2d")
        self.groups: list[list[str]] = []  # layers fed the same input share one designed A and one basis
        self.bases: dict[str, SubspaceBasis] = {}  # by the group's first layer name
        self.design_log: list[dict[str, Any]] = []

    def epoch_lr_factor(self, epoch: int, epochs: int) -> float:
        """The official code's per-epoch schedule (baselines.md 3.4 step 6, 3.6)."""
        if self.options.lr_schedule == "cosine" and epochs > 1:
            return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
        if self.options.lr_schedule == "multistep" and epoch >= 4:
            return 0.1
        return 1.0

    # ----- per task ----------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Grow the head; a new branch per layer with B = 0 and A = 0 until prepare_task designs it."""
        super().begin_task(task)
        self.freeze_branches()
        branch_name = f"task_{task.index}"
        for layer in self.layers.values():
            branch = layer.add_branch(branch_name, self.options.rank, float(self.options.rank), init="none")
            with torch.no_grad():
                branch.lora_A.zero_()
            branch.lora_A.requires_grad_(False)

    def _covariances(self, batches: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
        assert self.model is not None
        was_training = self.model.training
        self.model.eval()
        covariances, groups = collect_input_covariances(self.layers, batches, self.model.input_pass)
        self.model.train(was_training)
        if not self.groups:
            self.groups = groups
        return covariances

    @torch.no_grad()
    def prepare_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Design A_t of every layer group from C_t projected away from the stored subspace (baselines.md 3.3)."""
        started = time.perf_counter()
        covariances = self._covariances(train_loader)
        branch_name = f"task_{task.index}"
        smallest = []
        for group in self.groups:
            leader = group[0]
            memory = self.bases.get(leader)
            free = memory.free_projector() if memory is not None else None
            if self.options.design == "random":
                down, last_singular = random_down_projection(covariances[leader].shape[0], self.options.rank, self.context.seed, task.index), 0.0
            else:
                down, last_singular = design_down_projection(covariances[leader], free, self.options.rank, self.options.design)
            smallest.append(last_singular)
            for name in group:
                lora_A = self.layers[name].branches[branch_name].lora_A
                lora_A.copy_(down.to(lora_A.dtype))
        self.design_log.append(
            {
                "task": task.name,
                "min_rth_singular_value": min(smallest) if smallest else None,
                "design_s": time.perf_counter() - started,  # covariance pass + SVDs, outside the train steps
            }
        )

    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Second covariance pass with the trained model, then the (Dual)GPM update; freeze the branch."""
        started = time.perf_counter()
        self.update_memory(task, train_loader)
        if self.design_log and self.design_log[-1]["task"] == task.name:
            self.design_log[-1]["memory_update_s"] = time.perf_counter() - started
        self.freeze_branches()
        super().end_task(task, train_loader)

    def absorb_base_session(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """A base session's task is an earlier task too: its inputs enter the memory before task 1."""
        self.update_memory(task, train_loader)
        super().absorb_base_session(task, train_loader)

    @torch.no_grad()
    def update_memory(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        covariances = self._covariances(train_loader)
        threshold = threshold_for_task(task.index + 1, self.context.num_tasks, self.options.lamb, self.options.lame)
        dual = self.options.basis_update == "dual_gpm"
        for group in self.groups:
            leader = group[0]
            if leader in self.bases:
                self.bases[leader] = update_basis(self.bases[leader], covariances[leader], threshold, self.options.energy, dual)
            else:
                self.bases[leader] = first_basis(covariances[leader], threshold, self.options.energy, dual)

    # ----- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for leader, memory in self.bases.items():
            state[BASIS_PREFIX + leader] = memory.basis
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = next(iter(self.layers.values())).base_layer.weight.device
        bases = {
            key[len(BASIS_PREFIX) :]: SubspaceBasis(value.to(device=device, dtype=torch.float32).clone())
            for key, value in state.items()
            if key.startswith(BASIS_PREFIX)
        }
        self.bases = {}  # so the base class's key check sees only model tensors
        super().load_state_dict({key: value for key, value in state.items() if not key.startswith(BASIS_PREFIX)})
        self.bases = bases

    def extra_state(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "flags": {leader: memory.flag for leader, memory in self.bases.items()},
            "basis_dims": {leader: int(memory.basis.shape[1]) for leader, memory in self.bases.items()},
            "design_log": self.design_log,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.groups = [list(group) for group in state.get("groups", [])]
        for leader, flag in state.get("flags", {}).items():
            self.bases[leader].flag = flag
        self.design_log = list(state.get("design_log", []))

    def task_metrics(self) -> dict[str, Any]:
        """Size of the old-task subspace per layer group (k, or d - k when the complement is stored)."""
        old_dims = {
            leader: memory.basis.shape[1] if memory.flag == "remove" else memory.dim - memory.basis.shape[1]
            for leader, memory in self.bases.items()
        }
        return {**super().task_metrics(), "old_subspace_dims": old_dims, "design_log": self.design_log}
