"""metalora: tensor adapters whose seed is generated per input by a mapping network (arXiv 2504.00460).

Spec: ../shared/specs/metalora.md. The frozen backbone (adapters off) reads each input once per batch; its
pooled features f(x) feed a small mapping net that outputs one seed slice per adapted slot; every slot adds a
CP or tensor-ring update built from its static factors and that seed (loracl.adapters.tensor).

Continual learning (all our design, spec section 4):
* `expand` (default): one block (factors + base seeds + mapping net) per task, frozen after its task. At test
  time the block is chosen by the task id in task-incremental runs, otherwise by the nearest class mean of
  the frozen features (Mahalanobis with a shared shrunk covariance by default, or cosine). batch["task_ids"] is read
  only in task-incremental runs.
* `shared` / `naive` / `single`: one block and one mapping net for every task; `shared` adds the seed
  distillation loss lambda_sd * mean_b ||sigma_b - sigma_b^old||^2 against the previous task's mapping net.
* `joint`: one block trained once on the union of all tasks (the engine's joint path).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from loracl.adapters.inject import find_target_modules, inject_adapters
from loracl.adapters.tensor import TensorAdapterLayer
from loracl.backbones.base import select_block_output
from loracl.config import Float
from loracl.data.stream import Task
from loracl.errors import ConfigError, LoraclError
from loracl.methods.base import Method, MethodContext, MethodOptions, present_pair
from loracl.methods.mean_router import MeanRouter
from loracl.methods.routing import Router, RouterMetric, predict_by_route, select_rows
from loracl.seeding import private_rng
from loracl.task_models.base import TaskModel

# Convolutions that are not inside residual blocks (stems, shortcuts, patch embeddings): not adapted by `auto`.
_NON_BLOCK_CONV = re.compile(r"(^|\.)(embedder|stem|shortcut|downsample|patch_embeddings|projection)(\.|$)")


class MetaLoraOptions(MethodOptions):
    """Knobs of spec section 6; every default is the spec's."""

    decomposition: Literal["cp", "tr"] = Field(
        default="cp",
        description="The tensor form of each adapted layer's update: `cp` = CP decomposition with a diagonal seed, ΔW = γ·U diag(s) "
        "Vᵀ; `tr` = tensor ring closed by an R × R seed core. Source: secondary source (the two variants); the default is "
        "our design (not in the paper or code): CP has exactly LoRA-8's factor budget.",
    )
    cp_rank: int = Field(
        default=8,
        ge=1,
        description="R of the CP decomposition. Source: our design (not in the paper or code).",
    )
    tr_rank: int = Field(
        default=3,
        ge=1,
        description="R of the tensor ring (the ring's bond dimension). Source: our design (not in the paper or code).",
    )
    alpha: Float | None = Field(
        default=None,
        gt=0.0,
        description="Scale γ = alpha / R of the update; null = alpha = R, so γ = 1. Source: our design (not in the paper or code).",
    )
    tr_seed: Literal["full", "diag"] = Field(
        default="full",
        description="Tensor ring only: the seed is a full R × R condition core, or `diag` = diag(s). Source: our design (not in the "
        "paper or code).",
    )
    cp_conv_modes: Literal[3, 4] = Field(
        default=4,
        description="CP on Conv2d: 4 modes (separate k_h and k_w factors) or 3 (one k_h·k_w factor). Source: our design (not in the "
        "paper or code).",
    )
    init: Literal["zero_out", "zero_seed"] = Field(
        default="zero_out",
        description="How ΔW ≡ 0 at initialisation: `zero_out` = the mapping net's last layer is zero and the seed is s₀ + σ with s₀ = "
        "1 (or I); `zero_seed` = the seed is σ itself. Both start exactly at the base model. Source: our design (not in "
        "the paper or code).",
    )
    mapping_width: int = Field(
        default=64,
        ge=1,
        description="Hidden width h of the mapping net LN → Linear(d_feat, h) → GELU → Linear(h, D_seed). Source: our design (not in "
        "the paper or code).",
    )
    generate: bool = Field(
        default=True,
        description="False: no mapping net, a static CP / TR-LoRA with the same routing (the control that isolates the generated "
        "seed). Source: our design (not in the paper or code).",
    )
    target_modules: str | list[str] = Field(
        default="auto",
        description="Which modules get adapters, with PEFT's semantics; `auto` = the query and value projections where they exist "
        "(also the q and v parts of a fused `qkv` split by `backbone.split_fused`), else every Conv2d inside residual "
        "blocks (not the stem, shortcuts or patch embedding). Source: our design (not in the paper or code).",
    )
    cl_mode: Literal["expand", "shared", "naive", "joint", "single"] = Field(
        default="expand",
        description="Continual-learning mode: `expand` = a new block and mapping net per task, frozen after it, examples routed to a "
        "task's block at test time; `shared` = one block and mapping net for every task plus seed distillation against "
        "the previous task's mapping net; `naive` = `shared` without distillation; `joint` = one block trained once on "
        "all tasks' data; `single` = the paper's single-task setting (one block, no routing). Source: our design (not in "
        "the paper or code).",
    )
    lambda_sd: Float = Field(
        default=1.0,
        ge=0.0,
        description="`cl_mode: shared` only: weight of the seed distillation λ_sd·mean_b‖σ_b − σ_b^old‖² against a frozen copy of the "
        "previous task's mapping net. Source: our design (not in the paper or code).",
    )
    # cosine was named first; mahalanobis became the default after it routed better on both measured streams
    # (docs/methods/metalora.md, sections metalora_routers_*)
    router: RouterMetric = Field(
        default="mahalanobis",
        description="How `expand` mode routes an example to a task: the nearest class mean of normalised frozen features by "
        "`mahalanobis` distance under one shared, shrunk within-class covariance (LDA-style), or by `cosine` similarity. "
        "Source: our design (not in the paper or code).",
    )
    mahalanobis_shrinkage: Float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Shrinkage λ of the Mahalanobis router's shared covariance: Σ ← (1 − λ)Σ + λ·tr(Σ)/d·I. Source: our design (not "
        "in the paper or code).",
    )
    restrict_to_routed_task: bool = Field(
        default=True,
        description="Score each routed example only over the classes of the task it was routed to. Source: our design (not in the "
        "paper or code).",
    )
    warm_start: bool = Field(
        default=False,
        description="Start each new task's block (and mapping net) as a copy of the previous one. Source: our design (not in the "
        "paper or code).",
    )
    cache_features: bool = Field(
        default=True,
        description="Cache the frozen features f(x) per training example (never used by predict, so serving cost is measured "
        "honestly). Source: our design (not in the paper or code).",
    )
    extractor: Literal["base", "embed", "blocks"] = Field(
        default="base",
        description="The frozen features f(x) the mapping net and the router read: `base` = the frozen backbone's pooled output (one "
        "extra full forward per input); `embed` = the embedding layer's output, mean-pooled (almost free, weaker); "
        "`blocks` = the token states after the first `extractor_blocks` frozen blocks, mean-pooled (the later blocks "
        "never run). Backbones without an `embeddings` module refuse `embed` and those without a transformer block stack "
        "refuse `blocks`, both at attach. Source: our design (not in the paper or code).",
    )
    extractor_blocks: int | None = Field(
        default=None,
        ge=1,
        description="`extractor: blocks` only: how many frozen blocks the extractor runs; null = a third of the stack, rounded up "
        "(2 of MiniLM-L6's 6, 4 of ViT-B's 12), chosen for serving cost, not accuracy. "
        "Source: our design (not in the paper or code).",
    )
    adapted_blocks: int | None = Field(
        default=None,
        ge=1,
        description="Adapt the target modules of the last N transformer blocks only (null = every block): a shorter adapted pass at "
        "the price of capacity; backbones without a block stack refuse it at attach. Source: our design (not in the paper or code).",
    )
    share_frozen_prefix: bool = Field(
        default=True,
        description="With extractor `base` and adapters only from block k > 0 on, predict replays the frozen pass's output after "
        "blocks 0..k−1 instead of running them again (same scores, those blocks hold no adapter); false runs the full "
        "passes (slower). Source: our design (not in the paper or code).",
    )

    @model_validator(mode="after")
    def _blocks_only_with_blocks_extractor(self) -> MetaLoraOptions:
        if self.extractor_blocks is not None and self.extractor != "blocks":
            raise ValueError(f"`extractor_blocks` is read only with extractor `blocks` (extractor is `{self.extractor}`)")
        return self


class MappingNet(nn.Module):
    """LN -> Linear(d_feat, h) -> GELU -> Linear(h, D_seed); last layer zero, no batch statistics (spec 3.2)."""

    def __init__(self, feature_size: int, width: int, seed_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_size)
        self.hidden = nn.Linear(feature_size, width)
        self.out = nn.Linear(width, seed_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, d_feat] -> seeds [B, D_seed]."""
        return self.out(F.gelu(self.hidden(self.norm(features))))

    def is_zero(self) -> bool:
        return bool((self.out.weight == 0).all() and (self.out.bias == 0).all())


class MetaLoraState(nn.Module):
    """The method's own tensors, registered on the model so they are saved with it: the mapping nets."""

    def __init__(self) -> None:
        super().__init__()
        self.mapping = nn.ModuleDict()


def resolve_metalora_targets(model: nn.Module, target_modules: str | list[str]) -> str | list[str]:
    """`auto`: query/value where they exist under any of their usual names (transformers, fused-qkv parts),
    else every Conv2d inside residual blocks (ResNet)."""
    if target_modules != "auto":
        return target_modules
    pair = present_pair(model)
    if pair is not None:
        return pair
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and not _NON_BLOCK_CONV.search(name)]
    return convs if convs else "all-linear"


class MetaLora(Method):
    """Input-conditioned CP / tensor-ring adapters with per-task blocks and frozen-feature routing."""

    name = "metalora"
    scores_unseen_tasks = False  # routes by class means of finished tasks
    description = "tensor adapters with per-input generated seeds (CP / tensor ring), routed per task"
    Options: ClassVar[type[MethodOptions]] = MetaLoraOptions
    options: MetaLoraOptions

    def __init__(self, options: MethodOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.trains_jointly = self.options.cl_mode == "joint"  # instance override of the class flag
        self.layers: dict[str, TensorAdapterLayer] = {}
        self.block_of_task: dict[int, str | None] = {}  # task index -> block name (None: base session, no adapter)
        self.feature_cache: dict[bytes, torch.Tensor] = {}
        self._seeds: torch.Tensor | None = None
        self._features: torch.Tensor | None = None
        self.old_mapping: MappingNet | None = None
        self.extractor_depth: int | None = None  # blocks the `blocks` extractor runs (set at attach)
        self.shared_prefix_depth = 0  # leading adapter-free blocks that predict replays (set at attach)

    # ----- structure -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.options.cp_rank if self.options.decomposition == "cp" else self.options.tr_rank

    @property
    def expands(self) -> bool:
        return self.options.cl_mode == "expand"

    def make_router(self, model: TaskModel) -> Router | None:
        """expand mode routes each example to one task's block: class means of the frozen features."""
        if not self.expands:
            return None
        return MeanRouter(model.backbone.hidden_size, self.options.router, self.options.mahalanobis_shrinkage)

    def attach(self, model: TaskModel) -> None:
        """Freeze the backbone, wrap the target slots (module order = seed slice order), register our state."""
        super().attach(model)
        model.backbone.freeze()
        if self.options.extractor == "embed" and getattr(model.backbone.model, "embeddings", None) is None:
            raise ConfigError(
                f"method `metalora`: extractor `embed` needs a backbone with an `embeddings` module (BERT-like text"
                f" encoders, ViT); `{model.backbone.name}` has none: use extractor `base`"
            )
        self.extractor_depth = self._extractor_depth(model)
        targets = resolve_metalora_targets(model.backbone.model, self.options.target_modules)
        names = self._in_adapted_blocks(model, find_target_modules(model.backbone.model, targets))
        self.layers = inject_adapters(model.backbone.model, names, lambda module, name: TensorAdapterLayer(module, name))
        self.shared_prefix_depth = self._shared_prefix_depth(model)
        self.state = MetaLoraState().to(next(model.backbone.parameters()).device)
        model.add_module("metalora", self.state)

    @staticmethod
    def _stack_size(model: TaskModel, option: str) -> int:
        """Number of transformer blocks; a ConfigError naming `option` for a backbone without a block stack."""
        try:
            return len(model.backbone.blocks())
        except LoraclError as error:
            raise ConfigError(f"method `metalora`: {option}: {error}; use extractor `base` and every block") from error

    def _in_adapted_blocks(self, model: TaskModel, names: list[str]) -> list[str]:
        """The target modules that lie in the last `adapted_blocks` blocks (all of them when it is unset)."""
        if self.options.adapted_blocks is None:
            return names
        stack_size = self._stack_size(model, "adapted_blocks")
        if self.options.adapted_blocks > stack_size:
            raise ConfigError(
                f"method `metalora`: adapted_blocks {self.options.adapted_blocks} is more than the backbone's"
                f" {stack_size} blocks"
            )
        first = stack_size - self.options.adapted_blocks
        indices = model.backbone.block_indices(names)
        kept = [name for name in names if (indices[name] if indices[name] is not None else -1) >= first]
        if not kept:
            raise ConfigError(f"method `metalora`: no target module lies in the last {self.options.adapted_blocks} blocks")
        return kept

    def _shared_prefix_depth(self, model: TaskModel) -> int:
        """How many leading blocks hold no adapter and can be replayed from the `base` extractor pass (0: none)."""
        if self.options.extractor != "base" or not self.options.share_frozen_prefix:
            return 0
        try:
            indices = list(model.backbone.block_indices(list(self.layers)).values())
        except LoraclError:
            return 0  # no block stack: nothing to replay
        return 0 if None in indices else min(index for index in indices if index is not None)

    def _extractor_depth(self, model: TaskModel) -> int | None:
        """How many frozen blocks the `blocks` extractor runs; None for the other extractors."""
        if self.options.extractor != "blocks":
            return None
        stack_size = self._stack_size(model, "extractor `blocks`")
        depth = self.options.extractor_blocks or math.ceil(stack_size / 3)
        if depth > stack_size:
            raise ConfigError(
                f"method `metalora`: extractor_blocks {depth} is more than the backbone's {stack_size} blocks"
            )
        return depth

    def seed_sizes(self) -> list[int]:
        """Seed numbers per slot in slot order: R (CP), R^2 (TR full) or R (TR diag)."""
        full_tr = self.options.decomposition == "tr" and self.options.tr_seed == "full"
        return [self.rank * self.rank if full_tr else self.rank] * len(self.layers)

    def add_block(self, block_name: str, seed_offset: int) -> None:
        """Factors on every slot and a mapping net, from a seeded private RNG (warm start copies the last block)."""
        assert self.model is not None
        previous = self.block_names()[-1] if self.block_names() else None
        with private_rng(self.context.seed, seed_offset):
            for layer in self.layers.values():
                block = layer.add_block(
                    block_name,
                    decomposition=self.options.decomposition,
                    rank=self.rank,
                    alpha=self.options.alpha,
                    init=self.options.init,
                    tr_seed=self.options.tr_seed,
                    cp_conv_modes=self.options.cp_conv_modes,
                )
                block.generated = self.options.generate
                if self.options.warm_start and previous is not None:
                    block.load_state_dict(layer.blocks[previous].state_dict())
                block.requires_grad_(True)
            if self.options.generate:
                device = next(self.model.backbone.parameters()).device
                mapping = MappingNet(self.model.backbone.hidden_size, self.options.mapping_width, sum(self.seed_sizes())).to(device)
                if self.options.warm_start and previous is not None:
                    mapping.load_state_dict(self.state.mapping[previous].state_dict())
                self.state.mapping[block_name] = mapping

    def block_names(self) -> list[str]:
        first = next(iter(self.layers.values()), None)
        return [] if first is None else list(first.blocks.keys())

    def freeze_block(self, block_name: str) -> None:
        for layer in self.layers.values():
            layer.blocks[block_name].requires_grad_(False)
        if block_name in self.state.mapping:
            self.state.mapping[block_name].requires_grad_(False)

    # ----- lifecycle -----------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if self.expands:
            for name in self.block_names():
                self.freeze_block(name)
            block_name = f"task_{task.index}"
            self.add_block(block_name, seed_offset=task.index)
        else:
            block_name = "shared"
            if block_name not in self.block_names():
                self.add_block(block_name, seed_offset=0)
            elif self.options.cl_mode == "shared" and self.options.lambda_sd > 0 and block_name in self.state.mapping:
                self.old_mapping = copy.deepcopy(self.state.mapping[block_name]).requires_grad_(False)
        self.block_of_task[task.index] = block_name
        self.activate(block_name)

    def absorb_base_session(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Task 0 trained the backbone itself: it routes to the plain model (no block)."""
        self.block_of_task[task.index] = None
        super().absorb_base_session(task, train_loader)  # routing slots of the base session's classes

    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Freeze the task's block (expand), store routing class means of the frozen features."""
        if self.expands:
            self.freeze_block(self.block_of_task[task.index])
        super().end_task(task, train_loader)  # task-model statistics, then the routing slots (expand mode)
        self._seeds = self._features = None

    def restore_task(self, task: Task, from_base_session: bool) -> None:
        """The task's block (frozen), mapping net and routing slots, before load_state_dict."""
        super().restore_task(task, from_base_session)
        if from_base_session:
            self.block_of_task[0] = None
        elif self.expands:
            self.freeze_block(self.block_of_task[task.index])

    # ----- features and seeds --------------------------------------------------------------------------
    def activate(self, block_name: str | None) -> None:
        for layer in self.layers.values():
            layer.active_block = block_name

    @torch.no_grad()
    def extract(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """f(x) [B, d_feat] from the frozen model with adapters off: pooled output (`base`), embeddings (`embed`)
        or the first blocks' token states (`blocks`)."""
        assert self.model is not None
        with self.adapters_bypassed():
            if self.options.extractor == "embed":
                return self.model.backbone.embedding_features(**inputs)
            if self.options.extractor == "blocks":
                assert self.extractor_depth is not None
                return self.model.backbone.block_features(self.extractor_depth, **inputs)
            return self.model.features(inputs)

    @torch.no_grad()
    def frozen_features_and_prefix(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """f(x), and the frozen output of the blocks below the first adapted one when the adapted pass can replay it."""
        assert self.model is not None
        if not self.shared_prefix_depth:
            return self.frozen_features(inputs), None
        with self.model.backbone.capture_block_output(self.shared_prefix_depth) as captured:
            features = self.extract(inputs)
        return features, captured[0]

    @torch.no_grad()
    def frozen_features(self, inputs: dict[str, torch.Tensor], use_cache: bool = False) -> torch.Tensor:
        """f(x) of the extractor [B, d_feat] (cached per example on request)."""
        if not (use_cache and self.options.cache_features):
            return self.extract(inputs)
        keys = _example_keys(inputs)
        missing = [index for index, key in enumerate(keys) if key not in self.feature_cache]
        if missing:
            subset = select_rows(inputs, torch.tensor(missing, device=_first(inputs).device))
            computed = self.extract(subset)
            for index, feature in zip(missing, computed):
                self.feature_cache[keys[index]] = feature.detach()
        return torch.stack([self.feature_cache[key] for key in keys])

    def set_seeds(self, block_name: str | None, features: torch.Tensor | None) -> torch.Tensor | None:
        """Activate a block and hand each slot its slice of sigma = M(f) [B, D_seed]; returns sigma."""
        self.activate(block_name)
        sigma = None
        if block_name is not None and block_name in self.state.mapping and features is not None:
            sigma = self.state.mapping[block_name](features)
        offset = 0
        for layer, size in zip(self.layers.values(), self.seed_sizes()):
            layer.generated_seed = None if sigma is None else sigma[:, offset : offset + size]
            offset += size
        return sigma

    def clear_seeds(self) -> None:
        for layer in self.layers.values():
            layer.generated_seed = None

    # ----- training ------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training forward of the current task's block: f once (no grad, cached), seeds, adapted pass."""
        assert self.model is not None and self.current_task is not None
        block_name = self.block_of_task[self.current_task.index]
        features = self.frozen_features(batch["inputs"], use_cache=True) if self.options.generate else None
        self._features = features
        self._seeds = self.set_seeds(block_name, features)
        try:
            return self.model(batch)
        finally:
            self.clear_seeds()

    def extra_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        """Shared mode: seed distillation against the previous task's mapping net (spec eq. 8)."""
        if self.options.cl_mode != "shared" or self.old_mapping is None or self._seeds is None or self.options.lambda_sd == 0:
            return None
        with torch.no_grad():
            old = self.old_mapping(self._features)
        return self.options.lambda_sd * (self._seeds - old).pow(2).sum(dim=1).mean()

    def features_for_prototypes(self, batch: dict[str, Any]) -> torch.Tensor:
        """Prototype-head features of the current task's adapted model."""
        assert self.model is not None and self.current_task is not None
        return self.adapted_features(batch["inputs"], self.block_of_task[self.current_task.index])

    @torch.no_grad()
    def adapted_features(
        self, inputs: dict[str, torch.Tensor], block_name: str | None, features: torch.Tensor | None = None, prefix: Any = None
    ) -> torch.Tensor:
        """Pooled features of the model with `block_name` active; `prefix` (from frozen_features_and_prefix, same
        rows) lets the pass skip the frozen blocks below the first adapted one."""
        assert self.model is not None
        if features is None and block_name is not None and self.options.generate:
            features, prefix = self.frozen_features_and_prefix(inputs)
        self.set_seeds(block_name, features)
        try:
            if prefix is None:
                return self.model.features(inputs)
            with self.model.backbone.skip_blocks(self.shared_prefix_depth, prefix):
                return self.model.features(inputs)
        finally:
            self.clear_seeds()

    # ----- routing -------------------------------------------------------------------------------------
    def batch_routing_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen features f(x) the mapping nets read (cached per training example) route as well."""
        return self.frozen_features(batch["inputs"], use_cache=True)

    # ----- inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Predictions for a batch; expand mode routes each sample to one task block (spec section 5)."""
        assert self.model is not None
        inputs = batch["inputs"]
        if not self.expands:  # one block for every task (a base-session task has none, but is served by it too)
            block_name = "shared" if "shared" in self.block_names() else None
            return self._predict_group(batch, block_name, None, None)
        features, prefix = self.frozen_features_and_prefix(inputs)
        router = self.router
        assert router is not None

        def as_task(task_index: int, rows: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
            block_name = self.block_of_task[task_index]
            group_prefix = None if prefix is None else select_block_output(prefix, rows.to(features.device))
            group_features = features[rows.to(features.device)] if block_name else None
            predictions = self._predict_group(group, block_name, group_features, group_prefix)
            if self.options.restrict_to_routed_task:
                predictions = self.model.restrict(predictions, router.task_classes(task_index))
            return predictions

        return predict_by_route(self.infer_routes(batch, features), batch, as_task, self.model.prediction_fill)

    def _predict_group(self, batch: dict[str, Any], block_name: str | None, features: torch.Tensor | None, prefix: Any) -> torch.Tensor:
        """One group's predictions with `block_name` active: class scores of the adapted features, or (a language
        model) its generated answers with the block's seeds held for the whole decoding."""
        assert self.model is not None
        inputs = batch["inputs"]
        if self.model.has_class_head:
            return self.model.predict(batch, features=self.adapted_features(inputs, block_name, features, prefix))
        if features is None and block_name is not None and self.options.generate:
            features = self.frozen_features(inputs)
        self.set_seeds(block_name, features)
        try:
            return self.model.predict(batch)
        finally:
            self.clear_seeds()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Also reads checkpoints written before 2026-12-02, which kept the router under `metalora.router.`."""
        legacy = "metalora.router."
        super().load_state_dict({("task_router." + key[len(legacy):] if key.startswith(legacy) else key): value for key, value in state.items()})

    def extra_state(self) -> dict[str, Any]:
        return {"block_of_task": {str(k): v for k, v in self.block_of_task.items()}, "slot_task": [] if self.router is None else self.router.slot_task.tolist()}

    # ----- accounting ----------------------------------------------------------------------------------
    def block_parameter_count(self, block_name: str) -> int:
        """|B_t|: the block's factors and base seeds on every slot plus its mapping net."""
        count = sum(layer.blocks[block_name].parameter_count() for layer in self.layers.values())
        if block_name in self.state.mapping:
            count += sum(parameter.numel() for parameter in self.state.mapping[block_name].parameters())
        return count

    def mapping_is_zero(self, block_name: str) -> bool:
        """True when the block's generated part is identically zero (then its update is static and mergeable)."""
        return block_name not in self.state.mapping or self.state.mapping[block_name].is_zero()


def _first(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return next(iter(inputs.values()))


def _example_keys(inputs: dict[str, torch.Tensor]) -> list[bytes]:
    """One exact key per example: its unpadded token ids (text) or its pixels (images)."""
    if "input_ids" in inputs and "attention_mask" in inputs:
        ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
        return [row[row_mask].numpy().tobytes() for row, row_mask in zip(ids, mask)]
    tensor = _first(inputs).cpu()
    return [row.numpy().tobytes() for row in tensor]


__all__ = ["MappingNet", "MetaLora", "MetaLoraOptions", "resolve_metalora_targets"]
