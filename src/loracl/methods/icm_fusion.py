"""icm_fusion in the continual stream: per-task LoRAs (same init seed) fused by ICM-Fusion (spec 8.3).

Modes [D]: `end` fuses all task LoRAs once after the last task (paper-faithful; earlier rows use every task
LoRA summed, as inc_lora); `online` fuses tasks 1..t after every task and then replaces the stored past LoRAs
by the F-VAE's regenerations D(z_j, v_j) (generative weight replay); `continue` also fuses after every task and
starts the next task's LoRA from the fused one. Test-time predictions use the fused LoRA once one exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from loracl.adapters.peft_io import LoraPair
from loracl.config import Float
from loracl.data.stream import Task
from loracl.fusion.host import LoraHost, TaskSupport
from loracl.fusion.icm_fusion import FusionTask, IcmFusion, IcmFusionOptions
from loracl.methods.base import LoraMethod, LoraOptions

FUSED = "fused"


class IcmFusionMethodOptions(LoraOptions):
    """LoRA knobs, the stream mode, checkpoint harvesting, the support buffer and the ICM-Fusion knobs.

    LoRA defaults are icm-fusion.md 8.2's per-task LoRAs [D] (r 8, alpha 16, dropout 0.05), not LoraOptions'.
    """

    rank: int = Field(default=8, ge=1, description="Rank r of each task's LoRA branch. Source: our design (not in the paper or code).")
    alpha: Float = Field(
        default=16.0,
        description="LoRA alpha of each task's branch: scale s = alpha / r (2 at the defaults). Source: our design (not in the paper or code).",
    )
    dropout: Float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapted layer's input, one mask shared by every branch of the layer (0 until 2026-11-22). "
        "Source: our design (not in the paper or code).",
    )

    mode: Literal["end", "online", "continue"] = Field(
        default="end",
        description="When the stream fuses: `end` = once after the last task (earlier rows use the sum of the task LoRAs); "
        "`online` = after every task, then each stored past LoRA is replaced by the F-VAE's regeneration from its posterior "
        "mean (generative weight replay); `continue` = after every task, and the next task's LoRA starts from the fused one "
        "(an ablation). Source: paper (`end`); `online` and `continue` are our design (not in the paper or code).",
    )
    harvest_checkpoints: int = Field(
        default=8,
        ge=0,
        description="Weight samples (checkpoints of the task's LoRA) harvested per task over the second half of its training, "
        "as the F-VAE's training data. Source: official code (ICM-LoRA trains on harvested checkpoints); the count is our "
        "design (not in the paper or code).",
    )
    support_per_task: int = Field(
        default=16,
        ge=1,
        description="Training examples kept per task for the in-context steps, counted as exemplar memory in the stored bytes. "
        "Source: our design (not in the paper or code).",
    )
    fusion: IcmFusionOptions = Field(
        default_factory=IcmFusionOptions,
        description="The ICM-Fusion knobs (the F-VAE, the meta phase and the fusion rule), the keys `loracl fuse` takes as "
        "`icm.<key>`. Source: see each key.",
    )

    @model_validator(mode="after")
    def _fused_rank_is_the_branch_rank(self) -> IcmFusionMethodOptions:
        if self.fusion.delta_rank is not None and self.fusion.delta_rank != self.rank:
            raise ValueError(
                f"fusion.delta_rank {self.fusion.delta_rank} != rank {self.rank}: in the stream the fused and regenerated "
                "LoRAs replace rank-r task branches (leave delta_rank unset)"
            )
        return self


class _TaskHead(torch.nn.Module):
    """The task's columns of the shared linear head (its own head, task id given)."""

    def __init__(self, head: torch.nn.Module, class_ids: list[int]) -> None:
        super().__init__()
        self.head, self.class_ids = head, class_ids

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)[:, self.class_ids]


class IcmFusionMethod(LoraMethod):
    """A fresh LoRA per task from the same seed; ICM-Fusion turns them into the one LoRA that serves every task."""

    name = "icm_fusion"
    task_models = ("classifier",)
    needs_class_head = "its in-context support loss is taken through the classifier head (fusion on language-model LoRAs is separate work)"
    description = "per-task LoRAs fused into one by task vectors and a fusion VAE (ICM-Fusion)"
    Options: ClassVar[type[IcmFusionMethodOptions]] = IcmFusionMethodOptions
    options: IcmFusionMethodOptions

    def __init__(self, options: IcmFusionMethodOptions, context: Any) -> None:
        super().__init__(options, context)
        self.samples: dict[int, list[dict[str, LoraPair]]] = {}
        self.supports: dict[int, dict[str, torch.Tensor]] = {}
        self.fusion_report: dict[str, Any] = {}
        self._step, self._harvest_from, self._every = 0, 0, 1

    # ----- lifecycle -------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.freeze_branches()
        branch = f"task_{task.index}"
        self.add_branches(branch, seed_offset=0)  # same A_0 for every task (spec G6)
        if self.options.mode == "continue" and self._has_fused():
            with torch.no_grad():
                for layer in self.layers.values():
                    fused, new = layer.branches[FUSED], layer.branches[branch]
                    if fused.lora_A.shape == new.lora_A.shape:
                        new.lora_A.copy_(fused.lora_A)
                        new.lora_B.copy_(fused.lora_B * (fused.scaling / new.scaling))
        for layer in self.layers.values():  # train the new LoRA alone
            layer.disabled_branches = {name for name in layer.branches if name != branch}
        self.samples[task.index] = []

    def prepare_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        steps = len(train_loader) * self.context.train.epochs // self.context.train.gradient_accumulation_steps  # type: ignore[arg-type]
        self._step, self._harvest_from = 0, steps // 2
        self._every = max(1, (steps - self._harvest_from) // max(1, self.options.harvest_checkpoints))

    def after_step(self) -> None:
        """Harvest a checkpoint of the current task's LoRA over the second half of training (ICM-LoRA)."""
        self._step += 1
        task = self.current_task
        if task is None or not self.options.harvest_checkpoints or self._step <= self._harvest_from:
            return
        if (self._step - self._harvest_from) % self._every == 0 and len(self.samples[task.index]) < self.options.harvest_checkpoints:
            self.samples[task.index].append(self._pairs(f"task_{task.index}"))

    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Keep the task's few examples, restore the serving composition (fusing where the mode says), then the
        shared end-of-task work (prototypes, head alignment) on the model that will serve."""
        self.seen_tasks.append(task)
        first = next(iter(train_loader))
        k = self.options.support_per_task
        self.supports[task.index] = {
            **{key: value[:k].detach().cpu() for key, value in first["inputs"].items()},
            "labels": first["labels"][:k].detach().cpu(),
        }
        last = task.index == self.context.num_tasks - 1
        for layer in self.layers.values():
            layer.disabled_branches = {FUSED} if FUSED in layer.branches else set()
        if self.options.mode != "end" or last:
            self._fuse()
        self.update_task_statistics(task, train_loader)

    # ----- fusion ----------------------------------------------------------------------------------
    def _pairs(self, branch: str) -> dict[str, LoraPair]:
        return {
            name: LoraPair(layer.branches[branch].lora_A.detach().clone(), layer.branches[branch].lora_B.detach().clone(), layer.branches[branch].scaling)
            for name, layer in self.layers.items()
        }

    def _has_fused(self) -> bool:
        return any(FUSED in layer.branches for layer in self.layers.values())

    def _support(self, task: Task) -> TaskSupport:
        stored = self.supports[task.index]
        device = next(self.model.parameters()).device  # type: ignore[union-attr]
        inputs = {key: value.to(device) for key, value in stored.items() if key != "labels"}
        remap = {c: i for i, c in enumerate(task.class_ids)}
        labels = torch.tensor([remap[int(y)] for y in stored["labels"]], device=device)
        return TaskSupport(inputs, labels, _TaskHead(self.model.head, task.class_ids))  # type: ignore[union-attr]

    def _fuse(self) -> None:
        assert self.model is not None
        tasks = [task for task in self.seen_tasks if task.index in self.supports]
        host = LoraHost(self.model.backbone, sorted(self.layers))
        fusion_tasks = [
            FusionTask(task.name, self._pairs(f"task_{task.index}"), self._support(task), self.samples.get(task.index, []))
            for task in tasks
        ]
        result = IcmFusion(self.options.fusion, host).fuse(fusion_tasks)
        host.remove()
        if self.options.mode == "online":  # keep generated, not stored, past LoRAs (generative weight replay)
            # each task's latent decoded under its own condition, de-normalised with the statistics it was encoded with
            for adapter, task in zip(result.decoded_task_adapters(), tasks):
                self._write_branch(f"task_{task.index}", adapter)
                self.samples[task.index] = []
        self._write_branch(FUSED, result.adapter)
        for layer in self.layers.values():
            layer.disabled_branches = {name for name in layer.branches if name != FUSED}
        self.fusion_report = {key: value for key, value in result.report.items() if key != "method"}

    def _write_branch(self, branch: str, pairs: dict[str, LoraPair]) -> None:
        for name, layer in self.layers.items():
            pair = pairs[name]
            if branch not in layer.branches:
                layer.add_branch(branch, pair.lora_A.shape[0], alpha=1.0, init="none")
            target = layer.branches[branch]
            target.requires_grad_(False)
            with torch.no_grad():
                target.lora_A.copy_(pair.lora_A)
                target.lora_B.copy_(pair.lora_B)
            target.scaling = pair.scaling

    # ----- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for index, stored in self.supports.items():
            for key, value in stored.items():
                state[f"icm_fusion.support.{index}.{key}"] = value
        # the harvested checkpoints an `end`-mode fusion still needs, so a resumed run fuses the same samples
        for index, samples in self.samples.items():
            for number, pairs in enumerate(samples):
                for module, pair in pairs.items():
                    prefix = f"icm_fusion.sample.{index}.{number}.{module}"
                    state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"] = pair.lora_A, pair.lora_B
                    state[f"{prefix}.scaling"] = torch.tensor(pair.scaling, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        supports: dict[int, dict[str, torch.Tensor]] = {}
        for key in [key for key in state if key.startswith("icm_fusion.support.")]:
            _, _, index, name = key.split(".", 3)
            supports.setdefault(int(index), {})[name] = state.pop(key)
        harvested: dict[int, dict[int, dict[str, dict[str, torch.Tensor]]]] = {}
        for key in [key for key in state if key.startswith("icm_fusion.sample.")]:
            index, number, rest = key[len("icm_fusion.sample.") :].split(".", 2)
            module, part = rest.rsplit(".", 1)
            harvested.setdefault(int(index), {}).setdefault(int(number), {}).setdefault(module, {})[part] = state.pop(key)
        if any(f".branches.{FUSED}." in key for key in state) and not self._has_fused():
            for layer in self.layers.values():  # the fused LoRA has the task LoRAs' rank and scaling
                layer.add_branch(FUSED, self.options.rank, self.options.alpha, use_rslora=self.options.use_rslora, init="none")
        super().load_state_dict(state)
        self.supports = supports
        self.samples = {task.index: [] for task in self.seen_tasks}
        for index, numbered in harvested.items():
            self.samples[index] = [
                {module: LoraPair(parts["lora_A"], parts["lora_B"], float(parts["scaling"])) for module, parts in numbered[number].items()}
                for number in sorted(numbered)
            ]
        for layer in self.layers.values():
            layer.disabled_branches = {name for name in layer.branches if name != FUSED} if FUSED in layer.branches else set()

    def extra_state(self) -> dict[str, Any]:
        return {"fused": self._has_fused(), "fusion": self.fusion_report}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.fusion_report = dict(state.get("fusion", {}))

    def task_metrics(self) -> dict[str, Any]:
        return {"mode": self.options.mode, **self.fusion_report}
