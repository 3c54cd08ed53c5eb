"""lorac_ipc: orthogonal LoRA composition (LoRAC) + important-parameter constraints (IPC), arXiv 2504.13407.

Per task: a new LoRA pair on every adapted matrix ("slot"), composed with the frozen earlier pairs through
learnable coefficients ω; an orthogonality penalty on the stacked down-projections; after the task, the
top-τ slots by AdaLoRA-style sensitivity × uncertainty of the whole effective weight are frozen for good.
Each task's ω snapshot defines one composed model per task. At test time a Mahalanobis nearest-cluster rule
on the first task's features (task-identity inference, TII) routes each example to its task's model, or the
newest model serves every example (w/o TII). The linear head is re-aligned after each task on pseudo-features
drawn from stored per-class Gaussians (task-adaptive prediction, TAP). Spec: specs/lorac-ipc.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from loracl import metrics
from loracl.adapters import inject_adapters
from loracl.adapters.orthogonal import TRAINING, ComposedLoraLayer
from loracl.backbones.alignment import ClassGaussians, realign_head
from loracl.backbones.heads import mask_to_classes
from loracl.config import Float
from loracl.data.stream import Task
from loracl.errors import ConfigError
from loracl.methods.base import Method, MethodOptions
from loracl.methods.cluster_router import ClusterRouter
from loracl.methods.routing import Router, SumOverProcesses, local_sum, predict_by_route
from loracl.seeding import derived_generator, private_rng
from loracl.task_models.base import TaskModel


class LoracIpcOptions(MethodOptions):
    """Defaults follow the official code's Sup-21K* CIFAR run (spec §6, §8 item 9) unless marked [D]."""

    rank: int = Field(default=16, ge=1, description="Rank r of each task's LoRA pair. Source: official code (the Sup-21K* CIFAR run).")
    alpha: Float = Field(
        default=1.0, gt=0.0, description="Scaling γ = alpha / r (1/r at the defaults). Source: official code (`lora_alpha=1`)."
    )
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="Which modules get adapters, with PEFT's semantics; the default adapts q, k, v, o, fc1 and fc2 in every "
        "block as separate slots (a fused `qkv` / `Wqkv` is split into q, k, v parts by `backbone.split_fused: auto`, the "
        "code's three slots on one fused linear). Source: official code.",
    )
    ortho_weight: Float = Field(
        default=0.5,
        ge=0.0,
        description="λ_orth, the weight of the loss Σ_free slots ‖ÃᵀÃ − I‖_F over the stacked down-projections; 0 is the "
        "orthogonality-off ablation. Source: official code.",
    )
    ortho_target: Literal["A", "Q"] = Field(
        default="A",
        description="What the orthogonality loss stacks: `A` = the raw down-projections (the code); `Q` = their reduced-QR "
        "factors (the paper's figure). "
        "Source: our design (not in the paper or code); it switches between the official code (`A`) and the paper (`Q`).",
    )
    ortho_squared: bool = Field(
        default=False,
        description="Square the Frobenius norm of the orthogonality loss; the code's norm is not squared. "
        "Source: our design (not in the paper or code).",
    )
    omega_lr_scale: Float = Field(
        default=1.0, gt=0.0, description="The composition coefficients ω learn at lr × this. Source: official code."
    )
    first_session_lr: Float | None = Field(
        default=None,
        gt=0.0,
        description="Learning rate of the first adapted task; null = the run's `train.lr`. Source: official code.",
    )
    ipc_threshold: Float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="τ, the fraction of slots IPC freezes after each task (the top ⌊τ·|S|⌋ by importance); 0 turns IPC off "
        "(plain LoRAC). Source: official code.",
    )
    ipc_beta1: Float = Field(
        default=0.85,
        ge=0.0,
        lt=1.0,
        description="β1, the EMA factor of the smoothed importance Ī ← β1·Ī + (1 − β1)·I. Source: official code.",
    )
    ipc_beta2: Float = Field(
        default=0.85,
        ge=0.0,
        lt=1.0,
        description="β2, the EMA factor of the uncertainty Ū ← β2·Ū + (1 − β2)·|I − Ī|. Source: official code.",
    )
    ipc_importance: Literal["effective_weight", "lora_factors"] = Field(
        default="effective_weight",
        description="What a slot's importance I is measured on: `effective_weight` = mean|W ⊙ ∂L/∂W| on the whole "
        "effective weight (the code); `lora_factors` = the older mean|A ⊙ ∇A| + mean|B ⊙ ∇B| score. "
        "Source: official code (`effective_weight`); `lora_factors` is our design (not in the paper or code).",
    )
    ipc_score: Literal["last_ema", "task_mean"] = Field(
        default="last_ema",
        description="The score S that ranks slots after a task: `last_ema` = Ī·Ū after the task's last step (the code); "
        "`task_mean` = Ī·Ū averaged over the task's steps. Source: official code (`last_ema`); `task_mean` is our design "
        "(not in the paper or code).",
    )
    ipc_count: Literal["all", "free"] = Field(
        default="all",
        description="How many slots are frozen after a task: `all` = k = ⌊τ·|S|⌋; `free` = ⌊τ·#free⌋ (the code's "
        "`--new_mask` counts non-zero scores). "
        "Source: our design (not in the paper or code).",
    )
    ipc_selection: Literal["top_k", "threshold"] = Field(
        default="top_k",
        description="Which slots are frozen: `top_k` = exactly the top k free slots (stable order on ties); `threshold` = "
        "the code's S ≥ θ rule, which can freeze more (and everything once k exceeds the non-zero scores). "
        "Source: our design (`top_k`, not in the paper or code); official code (`threshold`).",
    )
    tii: bool = Field(
        default=True,
        description="Task-identity inference: route each test example to its task's composed model; false = the newest "
        "model serves every example (the paper's w/o-TII variant). Source: official code.",
    )
    tii_clusters: int = Field(
        default=4, ge=1, description="K, the k-means clusters per class that TII keeps. Source: official code (2 for ImageNet-R)."
    )
    tii_ridge: Float = Field(
        default=1.0e-4, ge=0.0, description="Ridge added to each TII cluster's covariance. Source: official code."
    )
    tii_cov: Literal["full", "diag", "shared"] = Field(
        default="full",
        description="TII covariances: `full` = one per cluster (the code); `diag` = inverse shrunk variances only (no "
        "correlation step), H instead of H² floats per cluster, for memory-bound runs; `shared` = one within-cluster "
        "covariance pooled over every class and cluster (LDA-style, through the code's ridge, shrinkage and correlation "
        "steps), H² floats in all instead of H² per cluster (metalora's router showed shared covariances route better on "
        "this repository's streams). Source: official code (`full`); `diag` and `shared` are our "
        "design (not in the paper or code).",
    )
    head_realign: bool = Field(
        default=True,
        description="TAP: re-align the linear head on Gaussian pseudo-features after every task but the first; false is the "
        "head-re-alignment-off ablation. Source: official code.",
    )
    tap_centroids: int = Field(
        default=10, ge=1, description="k-means centroids per class stored for TAP, each with per-dimension variances. Source: official code."
    )
    tap_epochs: int = Field(default=50, ge=0, description="TAP epochs. Source: official code (its scripts).")
    tap_lr: Float = Field(
        default=0.005, gt=0.0, description="TAP learning rate (SGD, cosine per epoch, weight decay 0). Source: official code."
    )
    tap_momentum: Float = Field(default=0.9, ge=0.0, lt=1.0, description="TAP SGD momentum. Source: official code.")
    tap_batch_size: int = Field(
        default=320, ge=1, description="TAP mini-batch size (5 × the code's batch size 64). Source: official code."
    )
    tap_samples_per_cluster: int = Field(
        default=320, ge=1, description="Pseudo-features drawn per TAP cluster. Source: official code."
    )
    tap_iters_per_epoch: int | None = Field(
        default=None,
        ge=1,
        description="TAP mini-batches per epoch; null = the number of old classes (the code). "
        "Source: official code (null); a number is our design (not in the paper or code).",
    )
    tap_ridge: Float = Field(
        default=1.0e-4, ge=0.0, description="Variance added when sampling TAP pseudo-features. Source: official code."
    )
    measure_without_tii: bool = Field(
        default=True,
        description="With `tii` on, also score every test batch through the newest model (one extra forward per evaluated "
        "batch), so one run reports the w/o-TII scores on the same weights; measurement only. "
        "Source: our design (not in the paper or code).",
    )
    # the code scores every seen class with the routed model, hence off by default
    restrict_to_routed_task: bool = Field(
        default=False,
        description="With `tii` on, score each example only over the classes of the task TII inferred for it (the code "
        "scores every seen class with the routed model; the masking metalora uses). "
        "Source: our design (not in the paper or code).",
    )


class LoracIpc(Method):
    """LoRAC-IPC on the method contract; model k = the composition snapshot after the k-th adapted task."""

    name = "lorac_ipc"
    scores_unseen_tasks = False  # TII needs statistics of finished tasks
    description = "orthogonal LoRA composition + freezing the most important matrices, TII routing (LoRAC-IPC)"
    Options: ClassVar[type[MethodOptions]] = LoracIpcOptions
    options: LoracIpcOptions

    def __init__(self, options: MethodOptions, context: Any) -> None:
        super().__init__(options, context)
        if context.head.align:
            raise ConfigError("method `lorac_ipc`: head.align is its own TAP step (head_realign); leave head.align false")
        self.layers: dict[str, ComposedLoraLayer] = {}
        self.task_model: dict[int, int] = {}  # engine task index -> model index (0 = bare backbone)
        self.routing_model: int | None = None  # model of the first task: TII features [C]
        self.sensitivity: dict[str, torch.Tensor] = {}  # Ī per slot
        self.uncertainty: dict[str, torch.Tensor] = {}  # Ū per slot
        self.score_sum: dict[str, torch.Tensor] = {}  # Σ Ī·Ū over steps (ipc_score: task_mean)
        self.importance_steps = 0
        self.last_scores: dict[str, float] = {}
        self.newest_counts: dict[int, list[int]] = {}  # task -> [correct, total] of the w/o-TII shadow scores
        # this process's counts of the task being evaluated, summed over processes into newest_counts when it ends
        self.newest_pending: dict[int, list[int]] = {}
        self.newest_rows: list[list[float]] = []

    # ----- structure --------------------------------------------------------------------------------
    def attach(self, model: TaskModel) -> None:
        # TII (class-cluster task identification) and TAP (head re-alignment) act on a class head; a language model
        # is served, as the paper's w/o-TII row, by the newest composed model
        self.serves_newest_only = not model.has_class_head
        if self.context.head.type == "prototype":
            raise ConfigError("method `lorac_ipc`: needs head.type linear or cosine (TAP re-aligns a trained head)")
        super().attach(model)
        options = self.options
        self.layers = inject_adapters(
            model.adaptable,
            options.target_modules,
            lambda module, name: ComposedLoraLayer(module, name, options.rank, options.alpha),
        )
        device = next(model.backbone.parameters()).device
        # TAP's per-class Gaussians; their buffers travel with the method's state_dict
        self.class_gaussians = ClassGaussians(model.backbone.hidden_size, options.tap_centroids, options.tap_ridge, device)
        model.add_module("lorac_ipc_class_gaussians", self.class_gaussians)

    def make_router(self, model: TaskModel) -> Router | None:
        """TII (spec §3.3): clusters of the routing model's features per (task, class); none without a class head.
        A task-incremental run is given each example's task, so its router only keeps the slots (no clusters)."""
        if not (self.options.tii and model.has_class_head):
            return None
        if self.context.scenario == "task_incremental":
            return Router()
        options = self.options
        return ClusterRouter(model.backbone.hidden_size, options.tii_clusters, options.tii_ridge, options.tii_cov, self.context.seed)

    @property
    def pool_size(self) -> int:
        return next(iter(self.layers.values())).pool_size

    def set_model(self, model_index: int | None) -> None:
        """Every layer computes model k's weights (None: the training composition)."""
        for layer in self.layers.values():
            layer.model_index = model_index

    def begin_task(self, task: Task) -> None:
        """Head rows, a new pair per slot (seeded), and which of A, B, ω train (spec §4 steps 1-3)."""
        super().begin_task(task)
        self._close_evaluation_round()
        with private_rng(self.context.seed, task.index):
            positions = {layer.add_pair() for layer in self.layers.values()}
        (position,) = positions
        self.task_model[task.index] = position + 1
        track = self.options.ipc_threshold > 0 and self.options.ipc_importance == "effective_weight"
        for layer in self.layers.values():
            free = not layer.is_frozen
            for index in range(layer.pool_size):
                is_new = index == position
                layer.factors_A[index].requires_grad_(free and is_new)
                layer.factors_B[index].requires_grad_(free and is_new)
                layer.omega[index].requires_grad_(free and index < position)  # ω_t stays 1 during task t [C]
            layer.track_weight_gradient = track and free
            layer.weight_gradient = None
            layer.clear_cache()
        self.set_model(TRAINING)
        zero = torch.zeros(())
        self.sensitivity = {name: zero.clone() for name in self.layers}
        self.uncertainty = {name: zero.clone() for name in self.layers}
        self.score_sum = {name: zero.clone() for name in self.layers}
        self.importance_steps = 0

    def _close_evaluation_round(self) -> None:
        """Keep the w/o-TII row of the evaluation that followed the last task (the routing tally keeps TII's)."""
        if self.newest_counts:
            self.newest_rows.append([correct / total for _, (correct, total) in sorted(self.newest_counts.items())])
        self.newest_counts, self.newest_pending = {}, {}

    def absorb_base_session(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """A base session trained the backbone: it is model 0, the routing model, with statistics like a task."""
        self.task_model[task.index] = 0
        self.routing_model = 0
        super().absorb_base_session(task, train_loader)  # TII slots under the routing model
        self._store_tap_statistics(task, train_loader, 0)

    def restore_structure(self, finished_tasks: list[Task], base_session: bool = False) -> None:
        super().restore_structure(finished_tasks, base_session)
        if finished_tasks and finished_tasks[0].index == 0 and base_session:
            self.task_model[0] = 0
        if finished_tasks:
            self.routing_model = self.task_model[finished_tasks[0].index]
        self.routing_tally.history, self.newest_rows, self.newest_counts, self.newest_pending = [], [], {}, {}

    # ----- training ---------------------------------------------------------------------------------
    def parameter_groups(self, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
        """Adapter pairs at lr (first_session_lr on the first adapted task), ω at lr × omega_lr_scale, head."""
        if self.pool_size == 1 and self.options.first_session_lr is not None:
            lr = self.options.first_session_lr
        omega_ids = {id(p) for layer in self.layers.values() for p in layer.omega}
        groups = []
        for group in super().parameter_groups(lr, head_lr):
            omegas = [p for p in group["params"] if id(p) in omega_ids]
            others = [p for p in group["params"] if id(p) not in omega_ids]
            if others:
                groups.append({**group, "params": others})
            if omegas:
                groups.append({**group, "params": omegas, "lr": group["lr"] * self.options.omega_lr_scale})
        return groups

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        self.set_model(TRAINING)
        return super().forward(batch)

    def free_layers(self) -> dict[str, ComposedLoraLayer]:
        return {name: layer for name, layer in self.layers.items() if not layer.is_frozen}

    def orthogonality_loss(self) -> torch.Tensor:
        """Eq. (4) summed over free slots: ‖ÃᵀÃ − I‖_F with Ã = [sg(A_1..A_{t−1}), A_t] (or their Q factors)."""
        position = self.pool_size - 1
        total = torch.zeros((), device=next(iter(self.layers.values())).factors_A[0].device)
        for layer in self.free_layers().values():
            blocks = []
            for index in range(position + 1):
                block = layer.factors_A[index]
                if self.options.ortho_target == "Q":
                    block = torch.linalg.qr(block).Q  # reduced QR, differentiable
                blocks.append(block if index == position else block.detach())
            stacked = torch.cat(blocks, dim=1)  # [d_in, t·r]
            gram = stacked.T @ stacked - torch.eye(stacked.shape[1], device=stacked.device, dtype=stacked.dtype)
            norm = torch.linalg.matrix_norm(gram)
            total = total + (norm.square() if self.options.ortho_squared else norm)
        return total

    def extra_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        if self.options.ortho_weight == 0:
            return None
        return self.options.ortho_weight * self.orthogonality_loss()

    def after_backward(self) -> None:
        """IPC eqs. (6)-(8): instantaneous importance of each free slot, then the two EMAs."""
        if self.options.ipc_threshold == 0:
            return
        beta1, beta2 = self.options.ipc_beta1, self.options.ipc_beta2
        position = self.pool_size - 1
        for name, layer in self.free_layers().items():
            if self.options.ipc_importance == "effective_weight":
                if layer.weight_gradient is None:
                    continue
                importance = (layer.weight_value * layer.weight_gradient).abs().mean()
                layer.weight_gradient = None
            else:
                A, B = layer.factors_A[position], layer.factors_B[position]
                if A.grad is None or B.grad is None:
                    continue
                importance = (A.detach() * A.grad).abs().mean() + (B.detach() * B.grad).abs().mean()
            importance = importance.detach().cpu()
            self.sensitivity[name] = beta1 * self.sensitivity[name] + (1 - beta1) * importance
            self.uncertainty[name] = beta2 * self.uncertainty[name] + (1 - beta2) * (importance - self.sensitivity[name]).abs()
            self.score_sum[name] = self.score_sum[name] + self.sensitivity[name] * self.uncertainty[name]
        self.importance_steps += 1

    # ----- after the task ---------------------------------------------------------------------------
    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Snapshot ω (eq. 3), IPC selection (eqs. 9-10), class statistics, TAP head re-alignment."""
        position = self.pool_size - 1
        for layer in self.layers.values():
            layer.snapshot_omega(position)
            layer.track_weight_gradient = False
            layer.weight_gradient = None
        self.select_frozen_slots(position + 1)
        if self.serves_newest_only:
            super().end_task(task, train_loader)
            self.set_model(TRAINING)
            return
        if self.routing_model is None:
            self.routing_model = self.task_model[task.index]
        self._store_tap_statistics(task, train_loader, self.task_model[task.index])
        super().end_task(task, train_loader)  # task-model statistics, then TII's slots (record_routing)
        if self.options.head_realign and len(self.seen_tasks) > 1:
            self.realign_head()
        self.set_model(TRAINING)

    def importance_scores(self) -> dict[str, float]:
        """S_s = Ī_s·Ū_s after the last step (or its mean over the task); frozen slots score 0."""
        scores = {}
        for name, layer in self.layers.items():
            if layer.is_frozen:
                scores[name] = 0.0
            elif self.options.ipc_score == "last_ema":
                scores[name] = float(self.sensitivity[name] * self.uncertainty[name])
            else:
                scores[name] = float(self.score_sum[name]) / max(self.importance_steps, 1)
        return scores

    def select_frozen_slots(self, next_position: int) -> list[str]:
        """Freeze the top ⌊τ·N⌋ slots for every later task (eq. 10 with our tie rule); returns their names."""
        tau = self.options.ipc_threshold
        if tau == 0:
            return []
        scores = self.importance_scores()
        self.last_scores = scores
        free = [name for name, layer in self.layers.items() if not layer.is_frozen]
        population = len(self.layers) if self.options.ipc_count == "all" else len(free)
        k = math.floor(tau * population + 1e-9)
        if k == 0 or not free:
            return []
        if self.options.ipc_selection == "top_k":
            ranked = sorted(free, key=lambda name: -scores[name])  # sorted() is stable: ties keep model order
            chosen = ranked[:k]
        else:  # the official rule: θ = k-th largest score over all slots, freeze every free slot with S ≥ θ
            threshold = sorted(scores.values(), reverse=True)[min(k, len(scores)) - 1]
            chosen = [name for name in free if scores[name] >= threshold]
        for name in chosen:
            layer = self.layers[name]
            layer.freeze_from(next_position)
            for parameter in (*layer.factors_A, *layer.factors_B, *layer.omega):
                parameter.requires_grad_(False)
        return chosen

    @torch.no_grad()
    def _features(self, loader: Iterable[dict[str, Any]], model_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [n, H] (CPU, fp32) and labels of a loader under model k."""
        self.set_model(model_index)
        try:
            return self.task_features(loader)
        finally:
            self.set_model(TRAINING)

    def _store_tap_statistics(self, task: Task, loader: Iterable[dict[str, Any]], model_index: int) -> None:
        """TAP Gaussians of each class under the task's model (spec §3.4)."""
        if not self.options.head_realign:
            return
        features, labels = self._features(loader, model_index)
        for class_id in task.class_ids:
            self.class_gaussians.store(class_id, features[labels == class_id], self.context.seed)

    def batch_routing_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """TII's features: the pooled output of the first task's model [B, H] (spec §3.3)."""
        assert self.model is not None
        self.set_model(self.routing_model)
        try:
            return self.model.features(batch["inputs"])
        finally:
            self.set_model(TRAINING)

    def realign_head(self) -> None:
        """TAP (spec §3.4): SGD on the whole head with pseudo-features from every seen class's Gaussians."""
        assert self.model is not None and self.current_task is not None
        options = self.options
        old_classes = sum(len(task.class_ids) for task in self.seen_tasks[:-1])
        realign_head(
            self.model.head,
            self.class_gaussians,
            epochs=options.tap_epochs,
            lr=options.tap_lr,
            momentum=options.tap_momentum,
            batch_size=options.tap_batch_size,
            samples_per_cluster=options.tap_samples_per_cluster,
            iterations_per_epoch=options.tap_iters_per_epoch or old_classes,  # [C] one batch per old class
            generator=derived_generator(self.context.seed, self.current_task.index),
        )

    # ----- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Linear-head logits over the seen classes, each example through its (inferred) task's model."""
        assert self.model is not None
        inputs = batch["inputs"]
        if self.serves_newest_only:
            self.set_model(self.task_model[self.seen_tasks[-1].index] if self.seen_tasks else TRAINING)
            try:
                return self.model.predict(batch)
            finally:
                self.set_model(TRAINING)
        if self.router is None or len(self.seen_tasks) == 1:
            logits = self.predict_with_newest_model(inputs)
            if self.options.tii and self.options.measure_without_tii:
                self._count_newest(logits, batch)
            return logits
        newest_logits = None
        if self.options.measure_without_tii:
            newest_logits = self.predict_with_newest_model(inputs)
            self._count_newest(newest_logits, batch)
        routing_features = self.batch_routing_features(batch)
        newest_task = self.seen_tasks[-1].index
        classes_of_task = {task.index: task.class_ids for task in self.seen_tasks}

        def as_task(task_index: int, rows: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
            model_index = self.task_model[task_index]
            if model_index == self.routing_model:  # the features routing read are this model's already
                group_logits = self.model.head(routing_features[rows.to(routing_features.device)])
            elif task_index == newest_task and newest_logits is not None:
                group_logits = newest_logits[rows.to(newest_logits.device)]  # already computed for the shadow scores
            else:
                self.set_model(model_index)
                try:
                    group_logits = self.model.head(self.model.features(group["inputs"]))
                finally:
                    self.set_model(TRAINING)
            if self.options.restrict_to_routed_task:
                group_logits = mask_to_classes(group_logits, classes_of_task[task_index])
            return group_logits.float()

        routes = self.infer_routes(batch, routing_features)
        return predict_by_route(routes, batch, as_task, float("-inf"))

    def predict_with_newest_model(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The w/o-TII prediction: every example through the latest task's composed model."""
        assert self.model is not None
        self.set_model(self.task_model[self.seen_tasks[-1].index])
        logits = self.model(inputs)
        self.set_model(TRAINING)
        return logits

    def _count_newest(self, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        """Measurement only: per-task accuracy of the w/o-TII scores, reading labels and task ids as the engine does."""
        scores = logits.float().clone()  # the logits may still serve the newest task's rows
        task_ids = batch["task_ids"].cpu()
        if self.context.scenario == "task_incremental":  # the engine masks the other tasks' classes likewise
            for task in self.seen_tasks:
                rows = (task_ids == task.index).to(scores.device)
                scores[rows] = mask_to_classes(scores[rows], task.class_ids)
        correct = (scores.argmax(dim=1).cpu() == batch["labels"].cpu())
        for task_index in task_ids.unique().tolist():
            rows = task_ids == task_index
            counts = self.newest_pending.setdefault(task_index, [0, 0])
            counts[0] += int(correct[rows].sum())
            counts[1] += int(rows.sum())

    def after_evaluate_task(self, task: Task, sum_over_processes: SumOverProcesses = local_sum) -> None:
        """The task's w/o-TII shadow counts, summed over the processes that evaluated shards of its test split,
        then the routing tally's (every process calls both sums, counted or not)."""
        correct, total = sum_over_processes(self.newest_pending.pop(task.index, [0, 0]))
        if total:
            counts = self.newest_counts.setdefault(task.index, [0, 0])
            counts[0] += correct
            counts[1] += total
        super().after_evaluate_task(task, sum_over_processes)

    # ----- state ------------------------------------------------------------------------------------
    def _unused_pair_keys(self, frozen_from: dict[str, int]) -> set[str]:
        """Keys of pairs at frozen slots from the freeze on: never trained, never used, never stored."""
        keys = set()
        for name, layer in self.layers.items():
            start = frozen_from.get(name, -1)
            if start < 0:
                continue
            prefix = self._layer_prefix[name]
            for index in range(start, layer.pool_size):
                keys |= {f"{prefix}factors_A.{index}", f"{prefix}factors_B.{index}", f"{prefix}omega.{index}"}
        return keys

    @property
    def _layer_prefix(self) -> dict[str, str]:
        assert self.model is not None
        by_id = {id(module): name for name, module in self.model.named_modules()}
        return {name: by_id[id(layer)] + "." for name, layer in self.layers.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        unused = self._unused_pair_keys({name: int(layer.frozen_from) for name, layer in self.layers.items()})
        return {key: value for key, value in state.items() if key not in unused}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Pairs dropped by state_dict (frozen slots) keep their fresh, unused tensors."""
        assert self.model is not None
        prefixes = self._layer_prefix
        frozen = {name: int(state[prefixes[name] + "frozen_from"]) for name in self.layers if prefixes[name] + "frozen_from" in state}
        own = self.model.state_dict(keep_vars=True)
        filled = self._from_legacy_layout(state)
        for key in self._unused_pair_keys(frozen):
            if key not in filled and key in own:
                filled[key] = own[key].detach()
        super().load_state_dict(filled)
        for layer in self.layers.values():
            layer.clear_cache()

    def _from_legacy_layout(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint written before 2026-12-02 kept TAP and TII under `lorac_ipc_memory.`, TII's rows indexed by
        class id: renamed onto the class Gaussians and the router's slots, one per seen class in class order (the
        class-incremental layout that version wrote)."""
        legacy = "lorac_ipc_memory."
        if not any(key.startswith(legacy) for key in state):
            return dict(state)
        renames = {"tap.": "lorac_ipc_class_gaussians.", "tii_means": "task_router.cluster_means",
                   "tii_precisions": "task_router.cluster_precisions", "tii_valid": "task_router.cluster_valid",
                   "tii_scatter_count": "task_router.scatter_count", "tii_scatter": "task_router.scatter"}
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith(legacy):
                rest = key[len(legacy):]
                old = next(prefix for prefix in renames if rest.startswith(prefix))
                key = renames[old] + rest[len(old):]
            converted[key] = value
        if self.router is not None and "task_router.slot_task" not in converted:
            owner = {class_id: task.index for task in self.seen_tasks for class_id in task.class_ids}
            converted["task_router.slot_class"] = torch.tensor(sorted(owner), dtype=torch.long)
            converted["task_router.slot_task"] = torch.tensor([owner[class_id] for class_id in sorted(owner)], dtype=torch.long)
        return converted

    def extra_state(self) -> dict[str, Any]:
        tii_rounds = self.routing_tally.rounds()
        newest_rows = list(self.newest_rows)
        if self.newest_counts:
            newest_rows.append([correct / total for _, (correct, total) in sorted(self.newest_counts.items())])
        return {
            "frozen_slots": {name: int(layer.frozen_from) for name, layer in self.layers.items() if layer.is_frozen},
            "task_model": {str(key): value for key, value in self.task_model.items()},
            # the evaluation rounds so far, so a resumed run reports every round's routing accuracy
            "evaluation_rounds": {"tii_accuracy": tii_rounds, "without_tii_rows": newest_rows},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        rounds = state.get("evaluation_rounds", {})
        self.routing_tally.history = [float(value) for value in rounds.get("tii_accuracy", [])]
        self.newest_rows = [[float(value) for value in row] for row in rounds.get("without_tii_rows", [])]
        self.newest_counts, self.newest_pending = {}, {}

    def multi_process_refusal(self) -> str | None:
        if self.options.ipc_threshold > 0 and self.options.ipc_importance == "effective_weight":
            return (
                "IPC's effective_weight importance reads each process's own gradient of the composed weight, so the"
                " processes would freeze different slots; use ipc_importance: lora_factors (from the averaged factor"
                " gradients) or ipc_threshold: 0"
            )
        return None

    def export_refusal(self) -> str | None:
        if self.router is not None and len(self.seen_tasks) > 1:
            return (
                "task-identity inference (tii) serves each example with the composed model of its inferred task;"
                " with tii: false the newest composed model serves and exports"
            )
        return self.adapter_export_refusal()

    def lora_export(self) -> dict[str, Any]:
        """The newest composed model (what serves without TII) as one LoRA per slot."""
        self.set_model(self.task_model[self.seen_tasks[-1].index] if self.seen_tasks else TRAINING)
        try:
            return super().lora_export()
        finally:
            self.set_model(TRAINING)

    def task_metrics(self) -> dict[str, Any]:
        """Routing accuracy per evaluation round (the last is after the final task) and the freeze record."""
        # task-incremental runs are given the task: there is no task-identity inference to measure
        history = [] if self.context.scenario == "task_incremental" else self.routing_tally.rounds()
        frozen = {name: int(layer.frozen_from) for name, layer in self.layers.items() if layer.is_frozen}
        without_tii = {}
        rows = list(self.newest_rows)
        if self.newest_counts:
            rows.append([correct / total for _, (correct, total) in sorted(self.newest_counts.items())])
        if rows:
            width = max(len(row) for row in rows)
            matrix = [[round(v, 4) for v in row] + [None] * (width - len(row)) for row in rows]
            summary = metrics.summarize(matrix, [1] * width)
            without_tii = {
                "without_tii_accuracy_matrix": matrix,
                "without_tii_avg_accuracy": summary["avg_accuracy"],
                "without_tii_forgetting": summary["forgetting"],
            }
        per_position = [sum(1 for start in frozen.values() if start == position + 1) for position in range(self.pool_size)]
        return {
            "tii_accuracy": history[-1] if history else None,
            "tii_accuracy_per_round": [round(value, 4) for value in history],
            "adapted_slots": len(self.layers),
            "frozen_after_each_task": per_position,
            "frozen_slots_total": len(frozen),
            **without_tii,
        }
