"""The frozen backbone with one swappable LoRA ("host"): features, few-shot losses and their LoRA gradients.

Fusion needs to run a candidate adapter on a task's few examples: to compute task vectors (pooled features), the
in-context adaptation steps of ICM-Fusion (gradients w.r.t. the LoRA tensors) and LoRAHub's search loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loracl.adapters.fused import join_fused_projections
from loracl.adapters.inject import inject_adapters
from loracl.adapters.lora import LoraLayer
from loracl.adapters.peft_io import LoraPair
from loracl.errors import LoraclError

BRANCH = "candidate"


@dataclass
class TaskSupport:
    """A task's few examples: collated inputs, and either labels + the task's head, a language model's answers
    (`inputs` then hold prompt + answer with `target_ids`, scored by `answer_model`), or the teacher's features."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    head: nn.Module | None = None  # features [B, H] -> this task's logits [B, C_task]
    target_features: torch.Tensor | None = None  # [B, H] pooled features under the task's own LoRA
    answer_model: nn.Module | None = None  # a LanguageTaskModel on the host's backbone: answer-only cross-entropy

    def __post_init__(self) -> None:
        size = next(iter(self.inputs.values())).shape[0] if self.inputs else 0
        if size == 0:
            raise LoraclError("a task's example set is empty: fusion needs a few examples per task")


class LoraHost:
    """A backbone (loracl.backbones.Backbone: inputs -> pooled features) with one LoRA slot per adapted module."""

    def __init__(self, backbone: nn.Module, modules: list[str]) -> None:
        self.backbone = backbone
        # adapters name fused projections as the unsplit model has them (`attn.qkv`): join those back into one layer
        join_fused_projections(backbone.model, modules)
        existing = {name for name, module in backbone.model.named_modules() if isinstance(module, LoraLayer)}
        self.layers: dict[str, LoraLayer] = {
            name: module for name, module in backbone.model.named_modules() if isinstance(module, LoraLayer) and name in modules
        }
        missing = sorted(set(modules) - existing)
        if missing:
            injected = inject_adapters(backbone.model, missing, lambda module, name: LoraLayer(module, name))
            self.layers.update(injected)
        absent = sorted(set(modules) - set(self.layers))
        if absent:
            raise LoraclError(f"the base model has no module {absent[0]!r} that the adapters target")
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        backbone.eval()

    @property
    def device(self) -> torch.device:
        """Where the backbone lives: fusion runs its F-VAE and in-context steps there."""
        return next(self.backbone.parameters()).device

    def set_adapter(self, adapter: dict[str, LoraPair]) -> None:
        """Make `adapter` the only active LoRA (other branches on these layers are disabled meanwhile)."""
        for name, layer in self.layers.items():
            pair = adapter[name]
            branch = layer.branches[BRANCH] if BRANCH in layer.branches else None
            if branch is None or branch.lora_A.shape != pair.lora_A.shape:
                if branch is not None:
                    del layer.branches[BRANCH]
                branch = layer.add_branch(BRANCH, pair.lora_A.shape[0], alpha=1.0, init="none")
            branch.requires_grad_(False)
            with torch.no_grad():
                branch.lora_A.copy_(pair.lora_A)
                branch.lora_B.copy_(pair.lora_B)
            branch.scaling = pair.scaling
            layer.disabled_branches = {other for other in layer.branches if other != BRANCH}

    def remove(self) -> None:
        """Drop the candidate slot and re-enable the layers' own branches."""
        for layer in self.layers.values():
            if BRANCH in layer.branches:
                del layer.branches[BRANCH]
            layer.disabled_branches = set()

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features [B, H] of collated inputs (moved to the backbone's device)."""
        return self.backbone(**{key: value.to(self.device) for key, value in inputs.items()})

    def loss(self, support: TaskSupport) -> torch.Tensor:
        """A language model's answer loss, cross-entropy with the task's head when labels exist, else MSE to the
        teacher's features."""
        if support.answer_model is not None:
            batch = {"inputs": {key: value.to(self.device) for key, value in support.inputs.items()}}
            return support.answer_model.loss(support.answer_model(batch), batch, None, None)
        features = self.features(support.inputs)
        if support.head is not None and support.labels is not None:
            head_device = next(support.head.parameters(), features).device
            if head_device != features.device:
                raise LoraclError(f"a task's head is on {head_device} but the base model on {features.device}: move the head")
            return F.cross_entropy(support.head(features), support.labels.to(features.device))
        if support.target_features is None:
            raise LoraclError("a task's examples have neither labels with a head nor teacher features")
        return F.mse_loss(features, support.target_features.to(features.device))

    def loss_and_grads(self, adapter: dict[str, LoraPair], support: TaskSupport) -> tuple[float, dict[str, LoraPair]]:
        """The support loss of `adapter` and its gradient w.r.t. each lora_A / lora_B (backbone stays frozen)."""
        self.set_adapter(adapter)
        branches = {name: layer.branches[BRANCH] for name, layer in self.layers.items()}
        for branch in branches.values():
            branch.requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(support)
            tensors = [t for b in branches.values() for t in (b.lora_A, b.lora_B)]
            grads = torch.autograd.grad(loss, tensors)
        for branch in branches.values():
            branch.requires_grad_(False)
        out = {name: LoraPair(grads[2 * i], grads[2 * i + 1], 1.0) for i, name in enumerate(branches)}
        return float(loss.detach()), out

    @torch.no_grad()
    def eval_loss(self, adapter: dict[str, LoraPair], supports: list[TaskSupport]) -> float:
        """Mean support loss over tasks (LoRAHub's search objective)."""
        self.set_adapter(adapter)
        return sum(float(self.loss(support)) for support in supports) / len(supports)

    @torch.no_grad()
    def task_vector(self, adapter: dict[str, LoraPair], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. (3a) for an encoder: the mean over k examples of the pooled last hidden state, task LoRA active."""
        self.set_adapter(adapter)
        return self.features(inputs).float().mean(dim=0)
