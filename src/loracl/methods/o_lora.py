"""o_lora: a fresh LoRA per task, earlier pairs frozen and summed, the new down-projection pushed orthogonal
to every earlier one (O-LoRA, Wang et al., Findings of EMNLP 2023; baselines.md Part 1)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from loracl.config import Float
from loracl.data.stream import Task
from loracl.methods.base import LoraMethod, LoraOptions, RoutedLoraOptions
from loracl.seeding import private_rng
from loracl.task_models.base import TaskModel


class OLoraOptions(RoutedLoraOptions):
    """Defaults are the official code's: LoraOptions' rank 8, alpha 32 (s = 4), shared dropout 0.1; lambda_1 0.5,
    lambda_2 0."""

    lambda_orth: Float = Field(
        default=0.5,
        ge=0.0,
        description="λ1, the weight of the orthogonality loss between the new task's down-projection A_t and every earlier "
        "one (0.5 on the standard benchmark). Source: official code (its scripts).",
    )
    lambda_l2: Float = Field(
        default=0.0,
        ge=0.0,
        description="λ2, the weight of the L2 term Σ_layers (‖A_t‖_F + ‖B_t‖_F) on the new pair; it exists only in the code "
        "and is off on the standard benchmark. Source: official code.",
    )
    orth_penalty: Literal["abs", "squared"] = Field(
        default="abs",
        description="Form of the orthogonality loss on the overlap O = A_old A_tᵀ: `abs` = Σ |O| (the code), `squared` = Σ O² "
        "(as some paper summaries render it). Source: official code (`abs`); `squared` is our design (not in the paper or code).",
    )
    orth_reduction: Literal["sum", "mean"] = Field(
        default="sum",
        description="How the orthogonality loss is reduced: `sum` = raw sum over layers and entries (the code), `mean` = "
        "divided by the number of entries. Source: official code (`sum`); `mean` is our design (not in the paper or code).",
    )


class OLora(LoraMethod):
    """L = L_task + lambda_1 sum_l sum |A_old^l A_t^l^T| + lambda_2 sum_l (||A_t^l||_F + ||B_t^l||_F).

    A is PEFT's lora_A (the down-projection, rows in input space), as in the official code.
    """

    name = "o_lora"
    description = "per-task LoRA, orthogonality loss to earlier tasks' down-projections (peer baseline)"
    Options: ClassVar[type[LoraOptions]] = OLoraOptions
    options: OLoraOptions

    def attach(self, model: TaskModel) -> None:
        super().attach(model)
        self.current_branch: str | None = None
        self._old_down: dict[str, torch.Tensor | None] = {}

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.freeze_branches()
        self.current_branch = f"task_{task.index}"
        with private_rng(self.context.seed, task.index):  # the same draw as inc_lora's
            for layer in self.layers.values():
                layer.add_branch(
                    self.current_branch, self.options.rank, self.options.alpha,
                    dropout=0.0, use_rslora=self.options.use_rslora, init=self.options.init,
                )
        self.stack_old_down_projections()

    def stack_old_down_projections(self) -> None:
        """A_old [(t-1) r, d_in] per layer: the frozen down-projections, stacked once per task."""
        self._old_down = {}
        for name, layer in self.layers.items():
            old = [branch.lora_A.detach().flatten(1) for key, branch in layer.branches.items() if key != self.current_branch]
            self._old_down[name] = torch.cat(old, dim=0) if old else None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.stack_old_down_projections()  # restore_structure stacked the fresh (pre-load) values

    def overlaps(self) -> list[torch.Tensor]:
        """O^l = A_old^l A_t^l^T [(t-1) r, r] for every adapted layer; empty on the first task."""
        result = []
        for name, layer in self.layers.items():
            old = self._old_down.get(name)
            if old is not None:
                result.append(old @ layer.branches[self.current_branch].lora_A.flatten(1).T)
        return result

    def orthogonality_penalty(self) -> torch.Tensor | None:
        """sum_l sum_{j,k} |O^l[j,k]| (or O^2, or their mean over all entries); None on the first task."""
        overlaps = self.overlaps()
        if not overlaps:
            return None
        if self.options.orth_penalty == "abs":
            terms = [overlap.abs().sum() for overlap in overlaps]
        else:
            terms = [overlap.pow(2).sum() for overlap in overlaps]
        total = torch.stack(terms).sum()
        if self.options.orth_reduction == "mean":
            total = total / sum(overlap.numel() for overlap in overlaps)
        return total

    def l2_penalty(self) -> torch.Tensor:
        """sum_l (||A_t^l||_F + ||B_t^l||_F), plain (not squared) norms as in the code."""
        terms = [
            layer.branches[self.current_branch].lora_A.norm() + layer.branches[self.current_branch].lora_B.norm()
            for layer in self.layers.values()
        ]
        return torch.stack(terms).sum()

    def extra_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        loss = None
        if self.options.lambda_orth > 0:
            orth = self.orthogonality_penalty()
            if orth is not None:
                loss = self.options.lambda_orth * orth
        if self.options.lambda_l2 > 0:
            l2 = self.options.lambda_l2 * self.l2_penalty()
            loss = l2 if loss is None else loss + l2
        return loss

    def task_metrics(self) -> dict[str, Any]:
        """The last task's overlap sum_l ||A_old A_t^T||_1, to check that the penalty did its job."""
        with torch.no_grad():
            overlaps = self.overlaps() if self.current_branch else []
        metrics = super().task_metrics()
        if overlaps:
            metrics["final_orth_overlap_l1"] = float(sum(o.abs().sum() for o in overlaps))
        return metrics
