"""The method contract: lifecycle hooks the engine calls around each task, with working defaults.

A method owns how adapters are injected into the task model's adaptable module, which parameters train on each
task, extra losses, what happens after each task, routing, and its state. What the answers are made of (a class
head and its statistics, or a language model's generated text) belongs to the task model (loracl.task_models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from loracl.adapters import (
    LoraLayer,
    adapter_layers,
    adapters_disabled,
    find_target_modules,
    inject_adapters,
)
from loracl.adapters.base import MultiBranchLayer
from loracl.adapters.fused import fold_part_pairs, fused_layouts
from loracl.adapters.lora import LoraBranch
from loracl.adapters.peft_io import LoraPair, branch_pair, served_lora_pair
from loracl.config import Float, HeadConfig, StrictModel, TrainConfig
from loracl.data.stream import Task
from loracl.errors import ConfigError, ExportRefused
from loracl.methods.mean_router import MeanRouter
from loracl.methods.routing import (
    RoutedBranchOptions,
    RoutedInferenceOptions,
    Router,
    RoutingTally,
    SumOverProcesses,
    local_sum,
    predict_by_route,
)
from loracl.seeding import private_rng
from loracl.task_models.base import TaskModel


class MethodOptions(StrictModel):
    """A method's own config knobs (subclasses add fields); unknown keys are errors."""


class LoraOptions(MethodOptions):
    """Knobs shared by the LoRA-based methods; defaults are the O-LoRA code's (baselines.md Part 2: seq_lora and
    inc_lora are O-LoRA with its regularisers off): rank 8, alpha 32 (scale 4), dropout 0.1 on the input, one mask
    shared by every branch of a layer."""

    rank: int = Field(
        default=8, ge=1, description="Rank r of each LoRA pair (per task where the method adds one per task). Source: official code (O-LoRA's `lora_dim`)."
    )
    alpha: Float = Field(
        default=32.0, description="LoRA alpha: each branch is scaled by s = alpha / r (4 at the defaults). Source: official code (O-LoRA)."
    )
    dropout: Float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapted layer's input, one mask shared by every branch of the layer. Source: official code (O-LoRA).",
    )
    target_modules: str | list[str] = Field(
        default="auto",
        description="Which modules get adapters, with PEFT's semantics (a list of name suffixes, a regex or `all-linear`); "
        "`auto` = the query and value projections where they exist (`query`/`value`, `q_proj`/`v_proj`, `q`/`v`, or the "
        "q and v parts of a fused projection), else every linear layer. Source: official code (O-LoRA adapts query and value).",
    )
    use_rslora: bool = Field(
        default=False,
        description="Rank-stabilised scaling s = alpha / √r instead of alpha / r (PEFT's `use_rslora`). Source: neighbouring code (PEFT).",
    )
    init: Literal["kaiming", "gaussian"] = Field(
        default="kaiming",
        description="Initialisation of the down-projection A: `kaiming` = Kaiming-uniform (PEFT's default), `gaussian` = "
        "N(0, 1/r²); B always starts at zero, so the model starts as the base model. Source: official code (PEFT's default, as O-LoRA).",
    )


class RoutedLoraOptions(LoraOptions, RoutedBranchOptions):
    """LoraOptions plus the [D] routed-inference switches (seq_lora, inc_lora, o_lora)."""


@dataclass
class MethodContext:
    """What a method may know about the run: head and training settings, seed, scenario."""

    head: HeadConfig
    train: TrainConfig
    seed: int = 0
    scenario: str = "class_incremental"
    num_tasks: int = 1


# The attention projections `auto` adapts, under the names different Hugging Face models use (BERT, ViT and
# most decoders, T5); InfLoRA's code adapts key and value instead.
QUERY_VALUE_NAMES = (["query", "value"], ["q_proj", "v_proj"], ["q", "v"])
KEY_VALUE_NAMES = (["key", "value"], ["k_proj", "v_proj"], ["k", "v"])


def present_pair(model: nn.Module, candidates: tuple[list[str], ...] = QUERY_VALUE_NAMES) -> list[str] | None:
    """The first candidate pair of projection names the model has (module name suffixes), or None."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return next((list(pair) for pair in candidates if set(pair) <= names), None)


def resolve_target_modules(
    model: nn.Module, target_modules: str | list[str], candidates: tuple[list[str], ...] = QUERY_VALUE_NAMES
) -> str | list[str]:
    """`auto`: the first candidate pair of attention projections the model has (PEFT's usual query/value
    choice by default), else every linear layer; anything else is passed through."""
    if target_modules != "auto":
        return target_modules
    return present_pair(model, candidates) or "all-linear"


class Method:
    """Base class: subclasses set `name`, `Options`, and override the hooks they need."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    trains_jointly: ClassVar[bool] = False  # the engine trains it once on all tasks' data
    scores_unseen_tasks: ClassVar[bool] = True  # predict works before a task's end_task (train.eval_next_task)
    # why the method needs a classifier head (it is refused on a language model), or "" when it does not
    needs_class_head: ClassVar[str] = ""
    task_models: ClassVar[tuple[str, ...]] = ("classifier", "language")  # the task-model kinds it runs on

    def __init__(self, options: MethodOptions, context: MethodContext) -> None:
        self.options = options
        self.context = context
        self.model: TaskModel | None = None
        self.current_task: Task | None = None
        self.seen_tasks: list[Task] = []
        self._base_tensor_ids: set[int] = set()

    # ----- lifecycle -------------------------------------------------------------------------------
    def attach(self, model: TaskModel) -> None:
        """Remember the task model and which tensors are the frozen pre-trained ones; subclasses inject adapters."""
        self.check_task_model(model)
        self.model = model
        self._base_tensor_ids = {id(tensor) for tensor in model.backbone.state_dict(keep_vars=True).values()}
        prepare = getattr(model, "prepare", None)
        if prepare is not None:
            prepare(self.context)
        self.routing_tally = RoutingTally()
        self.router: Router | None = self.make_router(model)
        if self.router is not None:
            self.router.to(next(model.backbone.parameters()).device)
            model.add_module("task_router", self.router)  # saved and restored with the model's state

    def make_router(self, model: TaskModel) -> Router | None:
        """The router this method routes test examples with (None: it does not route); by default the [D]
        `routed_inference` option's MeanRouter."""
        if isinstance(self.options, RoutedInferenceOptions) and self.options.routed_inference:
            return MeanRouter(model.hidden_size, self.options.router, self.options.router_shrinkage)
        return None

    def check_task_model(self, model: TaskModel) -> None:
        """Refuse, in one line, a task model this method cannot work with (e.g. one without a class head)."""
        if self.needs_class_head and not model.has_class_head:
            raise ConfigError(
                f"method `{self.name}` needs a classifier head ({self.needs_class_head}); the {model.kind} model has none"
            )

    def begin_task(self, task: Task) -> None:
        """The task model's structure for the task (head rows of a classifier), then the method's own."""
        assert self.model is not None, "attach() first"
        self.model.begin_task(task, self.context)
        self.current_task = task
        self.routing_tally.close_round()

    def prepare_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Optional data-dependent set-up before training (e.g. InfLoRA designs its A here)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything with requires_grad in the model: adapters this task trains and live head rows."""
        assert self.model is not None
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    def parameter_groups(self, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
        """Optimizer groups: the task model's head may use its own learning rate."""
        assert self.model is not None
        head_ids = {id(parameter) for parameter in self.model.head_parameters()}
        trainable = self.trainable_parameters()
        body = [parameter for parameter in trainable if id(parameter) not in head_ids]
        head = [parameter for parameter in trainable if id(parameter) in head_ids]
        groups = [{"params": body, "lr": lr}] if body else []
        if head:
            groups.append({"params": head, "lr": head_lr or lr})
        return groups

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training forward: the task model's outputs (classifier: logits over all classes seen so far)."""
        assert self.model is not None
        return self.model(batch)

    def epoch_lr_factor(self, epoch: int, epochs: int) -> float:
        """Multiplier of every group's learning rate during `epoch` (0-based) of `epochs`; constant by default."""
        return 1.0

    def task_loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The task model's training loss (classifier: cross-entropy over head.loss_scope's classes)."""
        assert self.model is not None
        return self.model.loss(outputs, batch, self.current_task, self.context)

    def extra_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        """Regularisers added to the task loss (orthogonality, sparsity, ...)."""
        return None

    def after_backward(self) -> None:
        """Gradient surgery between backward and the optimizer step (projection, masking)."""

    def after_step(self) -> None:
        """Work after each optimizer step (re-normalisation, clamping)."""

    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """After training: the task model's statistics (prototypes, class Gaussians, head alignment), routing."""
        self.seen_tasks.append(task)
        self.update_task_statistics(task, train_loader)
        self.record_routing(task, train_loader)

    def update_task_statistics(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """The task model's end-of-task statistics, under the model that will serve."""
        assert self.model is not None
        self.model.end_task(task, train_loader, self.context, self.seen_tasks, self.features_for_prototypes)

    def absorb_base_session(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Task 0 was a base session that trained the whole backbone: record it as a finished task."""
        assert self.model is not None
        self.current_task = task
        self.seen_tasks.append(task)
        self.model.absorb_base_session(task, train_loader, self.context, self.features_for_prototypes)
        self.record_routing(task, train_loader)

    def task_features(self, train_loader: Iterable[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [n, H] (features_for_prototypes, eval mode, CPU fp32) and labels [n] of a whole loader."""
        assert self.model is not None
        return self.model.task_features(train_loader, self.features_for_prototypes)

    def features_for_prototypes(self, batch: dict[str, Any]) -> torch.Tensor:
        """The serving features of a batch [B, H] the task model's statistics are taken on."""
        assert self.model is not None
        return self.model.features(batch["inputs"])

    # ----- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Predictions [B, ...] (classifier: scores over all classes seen so far; the engine masks them in
        task-incremental runs). With routed inference, each example is predicted as its inferred task."""
        if self.router is not None and self.router.num_slots:
            return self.routed_predict(batch)
        return self.score(batch)

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        """The method's own predictions for a batch under its adapters as they are now."""
        assert self.model is not None
        return self.model.predict(batch)

    # ----- routed inference ([D], RoutedInferenceOptions) ----------------------------------------------
    @torch.no_grad()
    def routing_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Frozen features the router reads [B, H]: the backbone with every adapter bypassed (`base`), or the
        mean of its embedding layer's output (`embed`)."""
        assert self.model is not None and isinstance(self.options, RoutedInferenceOptions)
        with self.adapters_bypassed():
            if self.options.router_features == "embed":
                return self.model.backbone.embedding_features(**inputs)
            return self.model.features(inputs)

    def batch_routing_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """routing_features of a batch; a method that caches frozen features per example may answer from its cache."""
        return self.routing_features(batch["inputs"])

    @contextmanager
    def adapters_bypassed(self) -> Iterator[None]:
        """Every adapter layer off for the duration (the frozen pre-trained model); a method with adapters
        outside its layers (a prompt) also switches those off."""
        assert self.model is not None
        if any(layer.merged for layer in adapter_layers(self.model).values()):
            raise RuntimeError("routed inference needs unmerged adapters: the router reads the frozen model")
        with adapters_disabled(self.model):
            yield

    @contextmanager
    def serving_as_of(self, task_index: int) -> Iterator[None]:
        """routed_branches: the branches of tasks after `task_index` off (branches named `task_<i>`)."""
        if not (isinstance(self.options, RoutedBranchOptions) and self.options.routed_branches):
            yield
            return

        def later(layer: MultiBranchLayer) -> set[str]:
            return set(layer.disabled_branches) | {name for name in layer.branches if _branch_task(name) > task_index}

        with self.branches_disabled(later):
            yield

    @contextmanager
    def branches_disabled(self, choose: Callable[[MultiBranchLayer], set[str]]) -> Iterator[None]:
        """Every multi-branch layer's disabled set replaced by `choose(layer)` for the duration, then restored."""
        layers = self._branch_layers()
        saved = [layer.disabled_branches for layer in layers]
        for layer in layers:
            layer.disabled_branches = choose(layer)
        try:
            yield
        finally:
            for layer, disabled in zip(layers, saved):
                layer.disabled_branches = disabled

    def _branch_layers(self) -> list[MultiBranchLayer]:
        assert self.model is not None
        return [module for module in self.model.modules() if isinstance(module, MultiBranchLayer)]

    @torch.no_grad()
    def record_routing(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Add a finished task's class slots to the router, from its training data's frozen features."""
        if self.router is None:
            return
        assert self.model is not None
        if self.context.scenario == "task_incremental":  # the protocol gives the task: only its classes are needed
            self.router.add_task(task.index, task.class_ids if self.model.has_class_head else [task.index])
            return
        was_training = self.model.training
        self.model.eval()
        # a model without classes (a language model) routes to tasks: one slot per task, named by its index
        class_ids = task.class_ids if self.model.has_class_head else [task.index]
        try:
            batches = (
                (self.batch_routing_features(batch), batch["labels"] if self.model.has_class_head else torch.full_like(batch["labels"], task.index))
                for batch in train_loader
            )
            self.router.record_task(task.index, class_ids, batches)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def infer_routes(self, batch: dict[str, Any], features: torch.Tensor | None = None) -> torch.Tensor:
        """Each example's task [B]: the protocol's task id in task-incremental runs, else the router's answer from
        frozen features (batch_routing_features unless given); tallied for the routing accuracy."""
        assert self.router is not None
        if self.context.scenario == "task_incremental":
            routes = batch["task_ids"]
        else:
            routes = self.router.route(features if features is not None else self.batch_routing_features(batch))
        self.routing_tally.add(routes)
        return routes

    @torch.no_grad()
    def routed_predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Each example predicted as its task: the task inferred by the router (the protocol's task id in
        task-incremental runs), the model as of that task, only that task's classes."""
        assert self.router is not None and self.model is not None
        router = self.router

        def as_task(task_index: int, rows: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
            classes = router.task_classes(task_index)
            if not classes:  # a task not trained yet (train.eval_next_task, task-incremental): the plain scores
                return self.score(group)
            with self.serving_as_of(task_index):
                return self.model.restrict(self.score(group), classes)

        return predict_by_route(self.infer_routes(batch), batch, as_task, self.model.prediction_fill)

    def multi_process_refusal(self) -> str | None:
        """Why the method cannot train with several processes as configured (None: it can). The engine averages
        every parameter's gradient and gives every process the whole data for prepare_task and end_task, so only
        what a method computes from rank-local tensors outside the parameters' gradients needs refusing."""
        return None

    # ----- export ----------------------------------------------------------------------------------
    def export_refusal(self) -> str | None:
        """Why the model this method serves now is not one PEFT LoRA on the backbone (None: it is one)."""
        if self.router is not None:
            return "each example is served by the adapters of the task it is routed to, not by one LoRA"
        return self.adapter_export_refusal()

    def adapter_export_refusal(self) -> str | None:
        """Why the backbone's adapters, as they serve now, are not one fixed LoRA (None: they are)."""
        assert self.model is not None
        layers = adapter_layers(self.model.backbone.model)
        if not layers:
            return "it puts no adapter into the backbone"
        if any(layer.served_delta() is None for layer in layers.values()):
            return "its adapters are generated from each input, so no fixed LoRA stands for them"
        return None

    def lora_export(self) -> dict[str, LoraPair]:
        """The backbone's served adapters as module -> LoraPair, exact (a classifier head is not part of it);
        ExportRefused, naming why, when no single LoRA can stand for what the method serves."""
        assert self.model is not None
        reason = self.export_refusal()
        if reason is not None:
            raise ExportRefused(f"method `{self.name}` cannot be exported as one PEFT LoRA: {reason}")
        pairs = {}
        for name, layer in adapter_layers(self.model.backbone.model).items():
            pair = served_lora_pair(layer)
            if pair is not None:
                pairs[name] = pair
        if not pairs:
            raise ExportRefused(f"method `{self.name}` cannot be exported as one PEFT LoRA: its adapters add nothing yet")
        return fold_part_pairs(pairs, fused_layouts(self.model.backbone.model))

    def task_lora(self, task_index: int) -> dict[str, LoraPair]:
        """Task `task_index`'s own LoRA (the branch `task_<i>` of every layer, with the layer's factor for it), for
        fusion; ExportRefused when the method keeps no such branch."""
        assert self.model is not None
        branch = f"task_{task_index}"
        pairs = {
            name: branch_pair(layer, branch)
            for name, layer in adapter_layers(self.model.backbone.model).items()
            if isinstance(layer, MultiBranchLayer) and isinstance(layer.branches[branch] if branch in layer.branches else None, LoraBranch)
        }
        if not pairs:
            raise ExportRefused(
                f"method `{self.name}` keeps no LoRA branch `{branch}` (per-task-branch methods such as inc_lora,"
                " o_lora, inflora, sd_lora and icm_fusion keep one per task)"
            )
        return pairs

    # ----- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a frozen pre-trained weight: adapters, heads, method buffers."""
        assert self.model is not None
        return {
            key: tensor.detach()
            for key, tensor in self.model.state_dict(keep_vars=True).items()
            if id(tensor) not in self._base_tensor_ids
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by state_dict (buffers whose size grew are resized first)."""
        assert self.model is not None
        own = self.model.state_dict(keep_vars=True)
        missing = sorted(set(self.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, value in state.items():
            target = own[key]
            if target.shape != value.shape:
                module_name, _, attribute = key.rpartition(".")
                module = self.model.get_submodule(module_name)
                if attribute in module._buffers:
                    module._buffers[attribute] = value.clone().to(device=target.device, dtype=target.dtype)
                    continue
                raise KeyError(f"state tensor {key} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)

    def extra_state(self) -> dict[str, Any]:
        """JSON-safe facts to store beside the tensors (chosen ranks, budgets, ...), per task."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore extra_state()."""

    def restore_structure(self, finished_tasks: list[Task], base_session: bool = False) -> None:
        """Re-create per-task structure (branches, head rows) for finished tasks, before load_state_dict."""
        assert self.model is not None
        for task in finished_tasks:
            self.restore_task(task, from_base_session=base_session and task.index == 0)
            self.seen_tasks.append(task)

    def restore_task(self, task: Task, from_base_session: bool) -> None:
        """One finished task's structure as begin_task built it (a base session only grew the head)."""
        assert self.model is not None
        if from_base_session:
            self.model.restore_task(task, self.context, from_base_session=True)
            self.current_task = task
        else:
            self.begin_task(task)

    def after_evaluate_task(self, task: Task, sum_over_processes: SumOverProcesses = local_sum) -> None:
        """Called once every test batch of `task` was predicted; lets a method score its own task-id inference
        (e.g. routing accuracy) against the truth without seeing it while predicting; the routes of a task not
        trained yet (train.eval_next_task) are not routing errors and are dropped. Under several processes each
        one predicted a shard of the test split: counts kept from predict are summed with `sum_over_processes`,
        which every process calls in the same order (an override must call it even with nothing counted)."""
        finished = {seen.index for seen in self.seen_tasks}
        self.routing_tally.close_task(task.name, task.index, keep=task.index in finished, sum_over_processes=sum_over_processes)

    def task_metrics(self) -> dict[str, Any]:
        """Method-specific numbers for results.json (routing accuracy of class- and domain-incremental runs)."""
        return {} if self.context.scenario == "task_incremental" else self.routing_tally.metrics()


class LoraMethod(Method):
    """Shared plumbing for methods built on LoraLayer wrappers around the targeted modules."""

    Options: ClassVar[type[MethodOptions]] = LoraOptions
    options: LoraOptions

    target_candidates: ClassVar[tuple[list[str], ...]] = QUERY_VALUE_NAMES  # what `target_modules: auto` adapts

    def attach(self, model: TaskModel) -> None:
        super().attach(model)
        targets = resolve_target_modules(model.adaptable, self.options.target_modules, self.target_candidates)
        self.layers: dict[str, LoraLayer] = inject_adapters(model.backbone.model, targets, self.make_layer)

    def make_layer(self, module: nn.Module, name: str) -> LoraLayer:
        """The wrapper put around each targeted module (dropout on its input when the options have one)."""
        dropout = self.options.dropout if isinstance(self.options, LoraOptions) else 0.0
        return LoraLayer(module, name, dropout)

    def add_branches(self, branch_name: str, seed_offset: int) -> None:
        """A new LoRA pair on every adapted layer, initialised from a seeded private RNG."""
        with private_rng(self.context.seed, seed_offset):
            for layer in self.layers.values():
                layer.add_branch(
                    branch_name,
                    self.options.rank,
                    self.options.alpha,
                    use_rslora=self.options.use_rslora,
                    init=self.options.init,
                )

    def freeze_branches(self) -> None:
        for layer in self.layers.values():
            for branch in layer.branches.values():
                branch.requires_grad_(False)


def _branch_task(branch_name: str) -> int:
    """The task index of a per-task branch name `task_<i>`; -1 for other branches (never switched off)."""
    prefix, _, index = branch_name.rpartition("_")
    return int(index) if prefix == "task" and index.isdigit() else -1


__all__ = [
    "KEY_VALUE_NAMES",
    "QUERY_VALUE_NAMES",
    "LoraMethod",
    "LoraOptions",
    "Method",
    "MethodContext",
    "MethodOptions",
    "RoutedLoraOptions",
    "adapter_layers",
    "find_target_modules",
    "resolve_target_modules",
]
