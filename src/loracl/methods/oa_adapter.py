"""oa_adapter: budget-adaptive gated adapters in orthogonal subspaces (OA-Adapter, arXiv 2505.22358).

Per task, every targeted Linear gets a fresh W2 · diag(soft(g; τ)) · W1 branch; the soft threshold learns how
many bottleneck dimensions the task keeps (r_eff per site). The current up-projection W2 is pushed orthogonal
to the active, γ-scaled up-projection columns of every earlier task (penalty λ ‖W2ᵀ H‖_F², H detached). After the
task its branch is pruned to the active dimensions and frozen; at test time all branches are summed, so no task
id is needed. Spec: specs/oa-adapter.md; docs/methods/oa_adapter.md lists what is the paper's and what is ours.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from loracl.adapters.gated import GatedBranch, GatedLayer, orthogonality_loss
from loracl.adapters.inject import inject_adapters
from loracl.config import Float
from loracl.data.stream import Task
from loracl.methods.base import Method, MethodOptions, resolve_target_modules
from loracl.methods.routing import RoutedBranchOptions
from loracl.seeding import private_rng
from loracl.task_models.base import TaskModel

logger = logging.getLogger("loracl")


class OaAdapterOptions(MethodOptions, RoutedBranchOptions):
    """OA-Adapter knobs; defaults are the spec's (§6 "Our defaults", §8)."""

    rank: int = Field(
        default=8,
        ge=1,
        description="r_max, the maximal bottleneck (the budget) of each site's adapter (16 on T5-large in the paper). "
        "Source: our design (not in the paper or code).",
    )
    target_modules: str | list[str] = Field(
        default="auto",
        description="Which modules get adapters, with PEFT's semantics; `auto` = the query and value projections, fixed by "
        "the paper's 4.72 M parameter match. Source: our design (not in the paper or code).",
    )
    dropout: Float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter input, one mask shared by all branches of a layer. Source: secondary source.",
    )
    gate_init: Float = Field(
        default=1.0e-2,
        description="g0, the initial value of every gate; must exceed `tau_init` in absolute value (validated), or every "
        "dimension starts inactive and never receives a gradient. Source: our design (not in the paper or code).",
    )
    tau_init: Float = Field(
        default=1.0e-3,
        ge=0.0,
        description="τ0, the initial threshold below which a gate's dimension is inactive. "
        "Source: secondary source (grid {1e-3, 1e-4, 1e-5}).",
    )
    tau_scope: Literal["site", "layer", "global"] = Field(
        default="site",
        description="Which dimensions share one threshold τ: `site` = one per adapter module, `layer` = one per transformer "
        "block, `global` = one for the model. Source: our design (not in the paper or code).",
    )
    train_threshold: bool = Field(
        default=True,
        description="Whether τ trains; false is the fixed-threshold ablation. Source: secondary source.",
    )
    clamp_threshold: bool = Field(
        default=True,
        description="Clamp τ at ≥ 0 after each optimizer step: a negative threshold no longer thresholds anything. "
        "Source: our design (not in the paper or code).",
    )
    budget: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description="`adaptive`: the gates and thresholds decide how many of the r_max dimensions stay open; `fixed`: the "
        "fixed-budget ablation (τ = 0 and frozen: all r_max dimensions stay open, g still learns its scale). "
        "Source: secondary source.",
    )
    orth_lambda: Float = Field(
        default=0.5,
        ge=0.0,
        description="λ_orth, the weight of the orthogonality penalty between the new task's up-projection columns and the "
        "columns earlier tasks reserved (O-LoRA's λ1); 0 is the orthogonality-off ablation. "
        "Source: our design (not in the paper or code).",
    )
    orth_normalize: bool = Field(
        default=False,
        description="Unit-normalise the historical columns in the penalty (direction only, so λ_orth is scale-free). "
        "Source: our design (not in the paper or code).",
    )
    orth_current: Literal["all", "active_scaled"] = Field(
        default="all",
        description="The current task's side of the penalty: `all` = every column of W2_t; `active_scaled` = W2_t·diag(γ_t), "
        "the columns scaled by their gates. Source: secondary source (its formula uses all columns).",
    )
    down_init: Literal["kaiming", "gaussian"] = Field(
        default="kaiming",
        description="Initialisation of the down-projection W1 (`kaiming` = PEFT's LoRA-A default); W2 always starts at 0, so "
        "the model starts as the base model. Source: our design (not in the paper or code).",
    )
    scaling: Float = Field(
        default=1.0,
        gt=0.0,
        description="Constant factor on every branch's output (OA-Adapter has no α/r). "
        "Source: our design (not in the paper or code).",
    )
    gate_lr_scale: Float = Field(
        default=1.0,
        gt=0.0,
        description="The gates g and thresholds τ learn at train.lr × this. Source: our design (not in the paper or code).",
    )
    inference: Literal["sum", "task_oracle"] = Field(
        default="sum",
        description="`sum`: every task's branch is summed at test time (no task id); `task_oracle`: only the test task's own "
        "branch (a diagnostic that needs the task id). Source: neighbouring code and secondary source.",
    )

    @model_validator(mode="after")
    def _gates_start_open(self) -> OaAdapterOptions:
        floor = self.tau_init if self.budget == "adaptive" else 0.0
        if abs(self.gate_init) <= floor:
            raise ValueError(
                f"gate_init ({self.gate_init}) must exceed {'tau_init' if floor else 0} ({floor}) in absolute value, "
                "or every dimension starts inactive and never receives a gradient"
            )
        return self


def layer_key(site: str) -> str:
    """The transformer block a site belongs to: its name up to the first numeric component (layer τ scope)."""
    match = re.search(r"^(.*?\.\d+)(\.|$)", site)
    return match.group(1) if match else site


class OaAdapter(Method):
    """A gated branch per task and site; orthogonality to earlier tasks' active up-projections; prune and freeze."""

    name = "oa_adapter"
    description = "gated bottleneck adapters, learned per-layer budget, orthogonal to earlier tasks' subspaces"
    Options: ClassVar[type[MethodOptions]] = OaAdapterOptions
    options: OaAdapterOptions

    def attach(self, model: TaskModel) -> None:
        super().attach(model)
        targets = resolve_target_modules(model.backbone.model, self.options.target_modules)
        dropout = self.options.dropout
        self.layers: dict[str, GatedLayer] = inject_adapters(
            model.backbone.model, targets, lambda module, name: GatedLayer(module, name, dropout)
        )
        self.history: dict[str, torch.Tensor | None] = {}
        self.budgets: dict[str, dict[str, int]] = {}  # task name -> site -> r_eff at task end
        self.thresholds: dict[str, dict[str, float]] = {}  # task name -> site -> τ at task end
        self.revivals: dict[str, dict[str, int]] = {}  # task name -> site -> inactive-to-active flips
        self._revival_counts: dict[str, torch.Tensor] = {}  # the current task's flips, still on the device
        self.orth_losses: dict[str, dict[str, float]] = {}  # task name -> site -> ‖W2ᵀH‖² at task end
        self._active: dict[str, torch.Tensor] = {}

    # ----- per-task structure ------------------------------------------------------------------------
    @staticmethod
    def branch_name(task: Task) -> str:
        return f"task_{task.index}"

    def current_branches(self) -> dict[str, GatedBranch]:
        assert self.current_task is not None
        name = self.branch_name(self.current_task)
        return {site: layer.branches[name] for site, layer in self.layers.items() if name in layer.branches}

    def _new_thresholds(self) -> dict[str, nn.Parameter]:
        """One τ per site, per block (layer scope) or one for all sites (global scope)."""
        fixed = self.options.budget == "fixed"
        value = 0.0 if fixed else self.options.tau_init
        groups: dict[str, nn.Parameter] = {}
        thresholds = {}
        for site, layer in self.layers.items():
            key = {"site": site, "layer": layer_key(site), "global": ""}[self.options.tau_scope]
            if key not in groups:
                weight = layer.base_layer.weight
                groups[key] = nn.Parameter(
                    torch.tensor(value, device=weight.device, dtype=weight.dtype),
                    requires_grad=self.options.train_threshold and not fixed,
                )
            thresholds[site] = groups[key]
        return thresholds

    def begin_task(self, task: Task) -> None:
        """Grow the head, freeze every earlier branch, cache each site's reserved subspace, add the new branch."""
        super().begin_task(task)
        self.freeze_branches()
        self.history = {site: self._history(layer) for site, layer in self.layers.items()}
        thresholds = self._new_thresholds()
        with private_rng(self.context.seed, task.index):
            for site, layer in self.layers.items():
                layer.add_branch(
                    self.branch_name(task),
                    self.options.rank,
                    gate_init=self.options.gate_init,
                    threshold=thresholds[site],
                    scaling=self.options.scaling,
                    init=self.options.down_init,
                )
        self._active = {site: branch.active_mask() for site, branch in self.current_branches().items()}
        self.revivals[task.name] = {site: 0 for site in self.layers}
        # summed on the model's device and read once in end_task: an int() per site and step stalls a GPU
        self._revival_counts = {}

    def _history(self, layer: GatedLayer) -> torch.Tensor | None:
        """H = [W2_s diag(γ_s) on active columns, s < t] [d_out, R], detached; None before any finished task."""
        blocks = [branch.reserved_columns() for branch in layer.branches.values()]
        if not blocks:
            return None
        history = torch.cat(blocks, dim=1)
        if self.options.orth_normalize:
            history = history / history.norm(dim=0, keepdim=True).clamp(min=1e-12)
        return history

    def freeze_branches(self) -> None:
        for layer in self.layers.values():
            layer.branches.requires_grad_(False)

    def parameter_groups(self, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
        """Factors at lr, gates and thresholds at lr · gate_lr_scale, head rows at head_lr."""
        groups = super().parameter_groups(lr, head_lr)
        if self.options.gate_lr_scale == 1.0 or not groups:
            return groups
        gate_ids = {
            id(parameter)
            for branch in self.current_branches().values()
            for parameter in (branch.gate, branch.threshold)
        }
        body = groups[0]["params"]
        gates = [parameter for parameter in body if id(parameter) in gate_ids]
        groups[0] = {"params": [parameter for parameter in body if id(parameter) not in gate_ids], "lr": lr}
        return [groups[0], {"params": gates, "lr": lr * self.options.gate_lr_scale}, *groups[1:]]

    # ----- training ----------------------------------------------------------------------------------
    def orthogonality_penalty(self) -> torch.Tensor | None:
        """Σ_sites Σ_{s<t} ‖W2_tᵀ W̃2_s‖_F² (spec eq. 6-7), before λ; None when there is no history."""
        total = None
        for site, branch in self.current_branches().items():
            history = self.history.get(site)
            if history is None or history.shape[1] == 0:
                continue
            up = branch.up if self.options.orth_current == "all" else branch.up * branch.gamma()
            term = orthogonality_loss(up, history)
            total = term if total is None else total + term
        return total

    def extra_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        if self.options.orth_lambda == 0:
            return None
        penalty = self.orthogonality_penalty()
        return None if penalty is None else self.options.orth_lambda * penalty

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep τ >= 0 (option) and count dimensions that came back to life (spec §8.13)."""
        branches = self.current_branches()
        if self.options.clamp_threshold:
            for branch in branches.values():
                branch.threshold.clamp_(min=0.0)
        if self.current_task is None:
            return
        for site, branch in branches.items():
            active = branch.active_mask()
            previous = self._active.get(site)
            if previous is not None:
                revived = (active & ~previous).sum()
                self._revival_counts[site] = self._revival_counts.get(site, 0) + revived
            self._active[site] = active

    def end_task(self, task: Task, train_loader) -> None:
        """Record r_eff and τ per site, prune the inactive dimensions, freeze the branch; then prototypes."""
        self.revivals[task.name] = {site: int(self._revival_counts.get(site, 0)) for site in self.layers}
        self.record_budget(task)
        for branch in self.current_branches().values():
            branch.prune()
        self.freeze_branches()
        super().end_task(task, train_loader)

    def record_budget(self, task: Task) -> None:
        branches = self.current_branches()
        self.budgets[task.name] = {site: branch.r_eff() for site, branch in branches.items()}
        self.thresholds[task.name] = {site: branch.threshold.item() for site, branch in branches.items()}
        with torch.no_grad():
            self.orth_losses[task.name] = {
                site: orthogonality_loss(branch.up, self.history.get(site)).item() for site, branch in branches.items()
            }
        budget = self.budgets[task.name]
        logger.info(  # the spec's per-task log line (section 4, step 7)
            "oa_adapter %s: r_eff %d of %d over %d sites, mean tau %.3g, L_orth %.3g; per site %s",
            task.name,
            sum(budget.values()),
            self.options.rank * len(budget),
            len(budget),
            sum(self.thresholds[task.name].values()) / max(len(budget), 1),
            sum(self.orth_losses[task.name].values()),
            budget,
        )

    # ----- inference ---------------------------------------------------------------------------------
    @contextmanager
    def serving(self, batch: dict[str, Any]) -> Iterator[None]:
        """The composition that scores `batch`: every branch (sum), or only its own task's (task_oracle)."""
        if self.options.inference == "sum":
            yield
            return
        own = f"task_{int(batch['task_ids'][0])}"
        with self.branches_disabled(lambda layer: {name for name in layer.branches if name != own}):
            yield

    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        """All branches summed (no task id); task_oracle keeps only the batch's own task's branch."""
        with self.serving(batch):
            return super().score(batch)

    def features_for_prototypes(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class statistics (prototypes, head.align) under the composition that will score this task."""
        with self.serving(batch):
            return super().features_for_prototypes(batch)

    # ----- accounting and state ----------------------------------------------------------------------
    def site_dims(self) -> dict[str, tuple[int, int]]:
        return {site: (layer.in_features, layer.out_features) for site, layer in self.layers.items()}

    def stored_adapter_params(self, task_name: str) -> int:
        """Σ_m r_eff,m (d_in + d_out) + r_eff,m + 1 (factors, γ entries, τ) for one finished task."""
        dims = self.site_dims()
        return sum(r * (dims[site][0] + dims[site][1]) + r + 1 for site, r in self.budgets[task_name].items())

    def max_adapter_params(self) -> int:
        """Σ_m r_max (d_in + d_out) + r_max + 1: what one task trains (the O-LoRA-sized budget plus gates)."""
        r = self.options.rank
        return sum(r * (d_in + d_out) + r + 1 for d_in, d_out in self.site_dims().values())

    def extra_state(self) -> dict[str, Any]:
        return {"r_eff": self.budgets, "tau": self.thresholds, "revivals": self.revivals, "orth_loss": self.orth_losses}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.budgets = {task: dict(sites) for task, sites in state.get("r_eff", {}).items()}
        self.thresholds = {task: dict(sites) for task, sites in state.get("tau", {}).items()}
        self.revivals = {task: dict(sites) for task, sites in state.get("revivals", {}).items()}
        self.orth_losses = {task: dict(sites) for task, sites in state.get("orth_loss", {}).items()}

    def task_metrics(self) -> dict[str, Any]:
        """r_eff per task (list over `sites`), active / maximal / cumulative stored adapter parameters."""
        sites = list(self.layers)
        tasks = list(self.budgets)
        active = [self.stored_adapter_params(task) for task in tasks]
        cumulative = [sum(active[: i + 1]) for i in range(len(active))]
        return {
            **super().task_metrics(),
            "sites": sites,
            "r_max": self.options.rank,
            "r_eff": {task: [self.budgets[task][site] for site in sites] for task in tasks},
            "active_adapter_params_per_task": active,
            "max_adapter_params_per_task": self.max_adapter_params(),
            "stored_adapter_params_cumulative": cumulative,
            "revivals": {task: sum(self.revivals.get(task, {}).values()) for task in tasks},
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        # A shared τ (layer/global scope) appears under several keys; safetensors refuses shared storage.
        return {key: value.clone() for key, value in super().state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Shrink restored branches to their saved (pruned) rank, then load as usual."""
        for site, layer in self.layers.items():
            for name, branch in layer.branches.items():
                key = f"backbone.model.{site}.branches.{name}.gate"
                if key in state:
                    branch.resize(int(state[key].shape[0]))
        super().load_state_dict(state)

    def restore_structure(self, finished_tasks: list[Task], base_session: bool = False) -> None:
        super().restore_structure(finished_tasks, base_session)
        self.freeze_branches()
