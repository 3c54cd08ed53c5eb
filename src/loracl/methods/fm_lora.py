"""fm_lora: factorized LoRA in one shared subspace, a dynamic rank selector, and a dynamic meta-prompt.

specs/fm-lora.md. Every adapted layer holds a shared rank-r subspace (A, B); task t trains only two r x r
cores M_t, N_t (F-LoRA, adapters/factorized.py). DRS picks how many of the r latent directions task t may
use (r_t) from a task-complexity score H(T_t) through a straight-through Gumbel-Softmax over candidate
ranks. DMP prepends L_p learnable prompt tokens after the embedding stage (BERT and ViT alike, through
hooks, so the backbones are untouched), anchored to the previous task's prompt and updated Reptile-style.
At the end of a task its cores fold into one accumulated core K, so prediction needs no task id.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from loracl.adapters.factorized import FactorizedLoraLayer
from loracl.adapters.inject import inject_adapters
from loracl.adapters.prompts import MetaPrompt, PrefixPrompt, attention_blocks
from loracl.config import Float
from loracl.data.stream import Task
from loracl.errors import ConfigError
from loracl.methods.base import Method, MethodOptions, resolve_target_modules
from loracl.methods.routing import RoutedInferenceOptions
from loracl.seeding import derived_generator
from loracl.task_models.base import TaskModel

DEFAULT_PROMPT_LAYERS = 5  # the deep prompt's blocks 0-4 (spec 2.5, DualPrompt's placement)


class FmLoraOptions(MethodOptions, RoutedInferenceOptions):
    """FM-LoRA's knobs; [D] defaults are specs/fm-lora.md section 6 (docs/methods/fm_lora.md explains each)."""

    rank: int = Field(
        default=8,
        ge=1,
        description="Shared rank r of every adapted layer's subspace (the A and B bases); our design suggests 16 for ViT-B "
        "and 8 for text streams. Source: our design (not in the paper or code).",
    )
    alpha: Float | None = Field(
        default=None,
        gt=0.0,
        description="Scale s = alpha / r of every update; null = r with orthonormal (SVD or random) bases, 2r with learned bases. "
        "Source: our design (not in the paper or code).",
    )
    target_modules: str | list[str] = Field(
        default="auto",
        description="Which modules get adapters, with PEFT's semantics (a list of name suffixes or a regex); `auto` = the query and "
        "value projections (`query`/`value` or `q_proj`/`v_proj`). Source: our design (not in the paper or code).",
    )
    shared_basis: Literal["svd", "svd_minor", "random_orthogonal", "learn_first_task", "learn_every_task"] = Field(
        default="svd",
        description="Where the shared bases A and B come from: `svd` = the top-r right/left singular vectors of the pre-trained "
        "weight W0, frozen; `svd_minor` = the r smallest; `random_orthogonal` = a seeded QR draw, frozen; "
        "`learn_first_task` = LoRA init, A and B train on the first task (cores fixed at identity, DRS off) and then "
        "freeze; `learn_every_task` = the same init, A and B keep training in every task. Source: our design (not in the "
        "paper or code).",
    )
    # DRS
    drs: Literal["gumbel", "deterministic", "off"] = Field(
        default="gumbel",
        description="Dynamic rank selector: `gumbel` = a straight-through Gumbel-Softmax over the candidate ranks picks the task's "
        "rank r_t; `deterministic` = the candidate whose share of r is closest to the complexity score H, no "
        "sampling; `off` = r_t = r. Source: paper (the Gumbel-Softmax); the logits, the other modes and every detail are our design (not in the "
        "paper or code).",
    )
    drs_granularity: Literal["global", "per_layer"] = Field(
        default="global",
        description="`global`: one selector and one rank r_t per task for every layer (the paper's summary speaks of one rank per "
        "task); `per_layer`: each adapted module has its own selector logits, Gumbel noise and committed r_t, the rank "
        "cost averaged over modules, and `chosen_ranks` maps each task to {module: r_t}; needs `drs: gumbel`. Source: our design (not in the paper or code).",
    )
    candidate_ranks: list[int] | None = Field(
        default=None,
        description="The candidate ranks R the selector chooses from, strictly increasing in [1, rank]; null = {r/4, r/2, 3r/4, r} "
        "rounded up. Source: our design (not in the paper or code).",
    )
    drs_beta: Float = Field(
        default=10.0,
        ge=0.0,
        description="β in the selector's logits z_k = −β(ρ_k − H)² + b_k (ρ_k the candidate's share of r, H the task's complexity, "
        "b_k a learned bias). Source: our design (not in the paper or code).",
    )
    tau_start: Float = Field(
        default=1.0,
        gt=0.0,
        description="Gumbel-Softmax temperature at the start of each task (annealed geometrically to `tau_min`). Source: our design "
        "(not in the paper or code).",
    )
    tau_min: Float = Field(
        default=0.1,
        gt=0.0,
        description="Gumbel-Softmax temperature at the end of the annealing; must not exceed `tau_start`. Source: our design (not in "
        "the paper or code).",
    )
    anneal_fraction: Float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Fraction of a task's steps over which the temperature anneals from `tau_start` to `tau_min`. Source: our design "
        "(not in the paper or code).",
    )
    commit_fraction: Float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of a task's last steps that use the noise-free arg-max rank mask (committed r_t); `anneal_fraction + "
        "commit_fraction` ≤ 1. Source: our design (not in the paper or code).",
    )
    rank_loss_weight: Float = Field(
        default=0.01,
        ge=0.0,
        description="λ_rank of the rank cost λ_rank·Σ_k π_k ρ_k, which keeps the selector from drifting to the full rank r. Source: "
        "our design (not in the paper or code).",
    )
    drs_lr_multiplier: Float = Field(
        default=10.0,
        gt=0.0,
        description="The selector's bias b trains at the run's learning rate × this (its own optimizer group). Source: our design "
        "(not in the paper or code).",
    )
    complexity_samples: int = Field(
        default=1024,
        ge=2,
        description="n_H, the number of training inputs (a seeded draw) whose frozen features give the task's complexity score H. "
        "Source: our design (not in the paper or code).",
    )
    similarity_dim: int = Field(
        default=8,
        ge=1,
        description="k_sim, the dimension of each task's feature basis U_t against which later tasks' novelty is measured. Source: "
        "our design (not in the paper or code).",
    )
    spectral_weight: Float = Field(
        default=0.5,
        ge=0.0,
        description="w_spec in H = clip(w_spec·h_spec + w_sim·h_sim, 0, 1): the weight of the spectral entropy of the task's "
        "features. Source: our design (not in the paper or code).",
    )
    similarity_weight: Float = Field(
        default=0.5,
        ge=0.0,
        description="w_sim in H = clip(w_spec·h_spec + w_sim·h_sim, 0, 1): the weight of the task's novelty against earlier tasks' "
        "feature subspaces. Source: our design (not in the paper or code).",
    )
    # DMP
    prompt_len: int = Field(
        default=8,
        ge=0,
        description="L_p, the number of tokens of the dynamic meta-prompt (DMP); 0 turns DMP off. Source: paper (a learnable prompt "
        "matrix); its size is our design (not in the paper or code).",
    )
    prompt_depth: Literal["shallow", "deep"] = Field(
        default="shallow",
        description="`shallow`: L_p prompt tokens inserted after [CLS] at the input; `deep`: L_p key and L_p value tokens prefixed "
        "inside each of the first `prompt_layers` attention blocks (prefix tuning; refused on a language model). The "
        "anchor loss sums over all prompt values, so at equal weight it pulls a deep prompt harder. Source: our design "
        "(not in the paper or code).",
    )
    prompt_layers: int | None = Field(
        default=None,
        ge=1,
        description="`prompt_depth: deep` only: blocks 0..n−1 get a prefix; null = blocks 0-4 (DualPrompt's placement; all blocks of "
        "a model with fewer). Source: our design (not in the paper or code).",
    )
    prompt_components: int = Field(
        default=1,
        ge=1,
        description="J; above 1, an input-conditioned mixture of J prompts, P(x) = Σ_j softmax(κ·cos(q(x), k_j))·P_j with q(x) the "
        "mean embedded input (shallow prompts only). Source: our design (not in the paper or code).",
    )
    prompt_key_temperature: Float = Field(
        default=10.0,
        gt=0.0,
        description="κ in the mixture weights softmax(κ·cos(q(x), k_j)) when `prompt_components` > 1. Source: our design (not in the "
        "paper or code).",
    )
    prompt_init_std: Float = Field(
        default=0.02,
        gt=0.0,
        description="Standard deviation of the prompt's normal initialisation. Source: our design (not in the paper or code).",
    )
    prompt_anchor_weight: Float = Field(
        default=0.1,
        ge=0.0,
        description="λ_P of the anchor loss λ_P·‖P − P̄_{t−1}‖² that pulls the prompt towards its value after the previous task (0 on "
        "the first trained task). Source: our design (not in the paper or code).",
    )
    meta_step: Float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="ε of the Reptile-style prompt update P̄_t = P̄_{t−1} + ε·(P_end − P̄_{t−1}) at the end of a task; 0 keeps the "
        "prompt fixed after the first task. Source: our design (not in the paper or code).",
    )
    # cores, head, regularisers
    core_form: Literal["double", "single"] = Field(
        default="double",
        description="`double`: Δ_t = s·B N_t diag(m_t) M_t A, two r × r cores and 2r² values per layer (the paper's count); `single`: "
        "one core, Δ_t = s·B N_t diag(m_t) A, r² values per layer (the ablation of the over-parameterised product). "
        "Source: our design (not in the paper or code).",
    )
    keep_task_cores: bool = Field(
        default=True,
        description="Keep each task's trimmed cores (N_t[:, :r_t], M_t[:r_t, :]) for analysis, `core_orth_weight` and `routed_cores`; "
        "the forward pass uses only the accumulated core K. Source: our design (not in the paper or code).",
    )
    core_orth_weight: Float = Field(
        default=0.0,
        ge=0.0,
        description="λ_orth of a penalty Σ_τ ‖(diag(m̃) M_t)(diag(m_τ) M_τ)ᵀ‖² between the new task's core and earlier tasks' kept "
        "cores; needs `keep_task_cores` and `core_form: double`. Source: our design (not in the paper or code).",
    )
    head_init: Literal["zero", "uniform"] = Field(
        default="zero",
        description="New head rows start at `zero`, or with nn.Linear's `uniform` init (the foundation's); with `head.type: cosine` "
        "only the unused biases are zeroed, since a zero row has no direction. Source: our design (not in the paper or "
        "code).",
    )
    routed_cores: Literal["off", "as_of_task", "own_task"] = Field(
        default="off",
        description="With `routed_inference`, which cores serve an example routed to task t: `off` = the final K; `as_of_task` = the "
        "sum of the kept cores of tasks ≤ t (its model as of task t, like `routed_branches`); `own_task` = task t's cores "
        "alone (a task-incremental diagnostic of a single increment). Needs `routed_inference` and `keep_task_cores`. "
        "Source: our design (not in the paper or code).",
    )
    inert_defaults: ClassVar[dict[str, Any]] = {
        "routed_cores": "off",
        "drs_granularity": "global",
        "prompt_depth": "shallow",
        "prompt_layers": None,
        "core_form": "double",
    }

    @model_validator(mode="after")
    def _check(self) -> FmLoraOptions:
        if self.candidate_ranks is not None:
            ranks = self.candidate_ranks
            if not ranks or sorted(set(ranks)) != ranks or ranks[0] < 1 or ranks[-1] > self.rank:
                raise ValueError(
                    f"candidate_ranks must be strictly increasing integers in [1, rank={self.rank}], got {ranks}"
                )
        if self.tau_min > self.tau_start:
            raise ValueError(f"tau_min ({self.tau_min}) must not exceed tau_start ({self.tau_start})")
        if self.anneal_fraction + self.commit_fraction > 1.0:
            raise ValueError(
                f"anneal_fraction + commit_fraction must be <= 1, got {self.anneal_fraction} + {self.commit_fraction}"
            )
        if self.core_orth_weight > 0 and not self.keep_task_cores:
            raise ValueError("core_orth_weight > 0 needs keep_task_cores: true (it compares with earlier tasks' cores)")
        if self.core_orth_weight > 0 and self.core_form == "single":
            raise ValueError("core_orth_weight > 0 compares the M_t cores, which core_form: single does not have")
        if self.prompt_depth == "deep" and self.prompt_components > 1:
            raise ValueError("prompt_components > 1 mixes input-level prompts: it needs prompt_depth: shallow")
        if self.prompt_depth == "deep" and self.prompt_len == 0:
            raise ValueError("prompt_depth: deep with prompt_len 0 has no prompt: set prompt_len > 0 or leave prompt_depth")
        if self.prompt_layers is not None and self.prompt_depth != "deep":
            raise ValueError("prompt_layers places the deep prompt: it needs prompt_depth: deep")
        if self.routed_cores != "off" and not (self.routed_inference and self.keep_task_cores):
            raise ValueError("routed_cores serves routed examples from the kept cores: it needs routed_inference and keep_task_cores")
        if self.drs_granularity == "per_layer" and self.drs != "gumbel":
            raise ValueError(f"drs_granularity: per_layer needs drs: gumbel (with drs: {self.drs} every layer gets the same rank)")
        if self.spectral_weight + self.similarity_weight == 0 and self.drs != "off":
            raise ValueError("spectral_weight and similarity_weight are both 0: H(T_t) would be constant")
        return self

    def ranks(self) -> list[int]:
        """The candidate ranks R (spec default {r/4, r/2, 3r/4, r}, rounded up, at least 1, deduplicated)."""
        if self.candidate_ranks is not None:
            return list(self.candidate_ranks)
        return sorted({max(1, math.ceil(self.rank * fraction)) for fraction in (0.25, 0.5, 0.75, 1.0)})


def spectral_complexity(features: torch.Tensor) -> tuple[float, torch.Tensor]:
    """h_spec in [0, 1] (normalised entropy of the covariance spectrum) and the eigenvectors, largest first."""
    centred = features.double() - features.double().mean(0, keepdim=True)  # [n, d]
    covariance = centred.T @ centred / max(1, features.shape[0] - 1)  # [d, d]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp(min=0).flip(0)
    eigenvectors = eigenvectors.flip(1)
    total = eigenvalues.sum()
    levels = min(features.shape[0] - 1, features.shape[1])
    if total <= 0 or levels < 2:
        return 0.0, eigenvectors
    p = eigenvalues / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((entropy / math.log(levels)).clamp(0.0, 1.0)), eigenvectors


def subspace_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """o = ||U_1^T U_2||_F^2 / k for two orthonormal bases [d, k] (1 = same subspace, 0 = orthogonal)."""
    k = min(first.shape[1], second.shape[1])
    return float((first.double().T @ second.to(first.device).double()).pow(2).sum() / k)


class FmLoraState(nn.Module):
    """Method tensors that live beside the layers: the prompt, the DRS bias b, each task's feature basis U_t."""

    def __init__(self, num_candidates: int, selector_groups: int = 1) -> None:
        super().__init__()
        shape = (num_candidates,) if selector_groups == 1 else (selector_groups, num_candidates)
        self.drs_bias = nn.Parameter(torch.zeros(shape))  # [n_R] global, or [layers, n_R] per layer
        self.similarity_bases = nn.Module()  # buffers U_<task> [d, k_sim]
        self.prompt: MetaPrompt | PrefixPrompt | None = None


class FmLora(Method):
    """F-LoRA cores in a shared subspace + DRS + DMP; one folded core per layer at test time."""

    name = "fm_lora"
    description = "factorized LoRA in a shared subspace, dynamic rank selection, dynamic meta-prompt"
    Options: ClassVar[type[MethodOptions]] = FmLoraOptions
    options: FmLoraOptions

    # ----- attach ------------------------------------------------------------------------------------
    def attach(self, model: TaskModel) -> None:
        super().attach(model)
        options = self.options
        self.candidate_ranks = options.ranks()
        learned = options.shared_basis.startswith("learn")
        alpha = options.alpha if options.alpha is not None else (2.0 * options.rank if learned else float(options.rank))
        init = "lora" if learned else options.shared_basis
        targets = resolve_target_modules(model.backbone.model, options.target_modules)  # auto: query and value (spec 2.2)
        generator = derived_generator(self.context.seed, 7)
        self.layers: dict[str, FactorizedLoraLayer] = inject_adapters(
            model.backbone.model,
            targets,
            lambda module, name: FactorizedLoraLayer(
                module, name, options.rank, alpha, init, generator, single_core=options.core_form == "single"
            ),
        )
        groups = len(self.layers) if options.drs_granularity == "per_layer" else 1
        self.state = FmLoraState(len(self.candidate_ranks), groups)
        model.fm_lora = self.state  # registered on the classifier so state_dict() saves it
        if options.prompt_len > 0:
            prompt_generator = derived_generator(self.context.seed, 11)
            hidden = model.backbone.hidden_size
            if options.prompt_depth == "deep":
                layers = options.prompt_layers or min(DEFAULT_PROMPT_LAYERS, len(attention_blocks(model.backbone.model)))
                prompt = PrefixPrompt(options.prompt_len, hidden, layers, options.prompt_init_std, prompt_generator)
            else:
                prompt = MetaPrompt(
                    options.prompt_len,
                    hidden,
                    options.prompt_components,
                    options.prompt_key_temperature,
                    options.prompt_init_std,
                    prompt_generator,
                )
            input_prompts = getattr(model.backbone, "input_prompts", None)
            if input_prompts is not None:  # a language model: the prompt tokens go in front of the prompt's tokens
                if options.prompt_depth == "deep":
                    raise ConfigError("method `fm_lora`: prompt_depth deep is not available on a language model; use shallow")
                input_prompts.append(prompt)
            else:
                prompt.install(model.backbone.model)
            self.state.prompt = prompt
        device = next(iter(self.layers.values())).shared_A.device
        self.state.to(device)
        self.chosen_ranks: list[int | list[int]] = []  # r_t of each trained task (one per layer under per_layer)
        self.complexity: list[dict[str, Any]] = []  # H(T_t) and its parts, per trained task
        self.trained_task_names: list[str] = []
        self.prompt_anchor: torch.Tensor | None = None
        self.total_steps = 1
        self.step = 0
        self._soft_probs: torch.Tensor | None = None
        self._noise: torch.Generator | None = None

    # ----- helpers -----------------------------------------------------------------------------------
    def _first_trained_task(self) -> bool:
        return len(self.chosen_ranks) == 0

    def _bases_train_now(self) -> bool:
        mode = self.options.shared_basis
        return mode == "learn_every_task" or (mode == "learn_first_task" and self._first_trained_task())

    def _learning_bases_from_zero(self) -> bool:
        """The first task of a learned-bases mode: M = N = I frozen, A and B train from LoRA's init (B = 0)."""
        return self.options.shared_basis.startswith("learn") and self._first_trained_task()

    def _drs_mode(self) -> str:
        """DRS is off while the bases learn from zero (else B's unused columns stay zero for ever)."""
        return "off" if self._learning_bases_from_zero() else self.options.drs

    def prefix_mask(self, rank: int) -> torch.Tensor:
        """c_k: the first `rank` entries one, the rest zero [r]."""
        device = self.state.drs_bias.device
        return (torch.arange(self.options.rank, device=device) < rank).float()

    def selector_logits(self) -> torch.Tensor:
        """z_k = -beta (rho_k - H)^2 + b_k over the candidate ranks [G, n_R] (G = 1 global, one row per layer)."""
        rho = torch.tensor(self.candidate_ranks, dtype=torch.float32, device=self.state.drs_bias.device) / self.options.rank
        target = self.complexity[-1]["H"] if len(self.complexity) > len(self.chosen_ranks) else 1.0
        return -self.options.drs_beta * (rho - target) ** 2 + self.state.drs_bias.view(-1, len(self.candidate_ranks))

    def temperature(self, step: int | None = None) -> float:
        """tau(step) = tau0 (tau_min / tau0)^min(1, step / (f_anneal S))."""
        step = self.step if step is None else step
        options = self.options
        progress = min(1.0, step / max(1e-9, options.anneal_fraction * self.total_steps))
        return options.tau_start * (options.tau_min / options.tau_start) ** progress

    def in_commit_phase(self) -> bool:
        return self.step >= (1.0 - self.options.commit_fraction) * self.total_steps

    def committed_ranks(self) -> list[int]:
        """r_t per selector group G (one, or one per adapted layer under per_layer): the noise-free argmax of the
        logits (gumbel), the candidate nearest H (deterministic), or r (off)."""
        groups = self.state.drs_bias.view(-1, len(self.candidate_ranks)).shape[0]
        mode = self._drs_mode()
        if mode == "off":
            return [self.options.rank] * groups
        if mode == "deterministic":
            rho = torch.tensor(self.candidate_ranks, dtype=torch.float64) / self.options.rank
            return [self.candidate_ranks[int((rho - self.complexity[-1]["H"]).abs().argmin())]] * groups
        return [self.candidate_ranks[index] for index in self.selector_logits().detach().argmax(dim=1).tolist()]

    def committed_masks(self) -> torch.Tensor:
        """The committed prefix masks [G, r]."""
        return torch.stack([self.prefix_mask(rank) for rank in self.committed_ranks()])

    def sample_mask(self) -> torch.Tensor:
        """This step's masks [G, r]: straight-through Gumbel samples (values in {0,1}, gradients to b), or the committed ones."""
        self._soft_probs = None
        if self._drs_mode() != "gumbel" or self.in_commit_phase() or not self.model.training:
            return self.committed_masks()
        logits = self.selector_logits()  # [G, n_R]
        uniform = torch.rand(logits.shape, generator=self._noise).clamp(1e-10, 1.0 - 1e-10).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform))
        soft = torch.softmax((logits + gumbel) / self.temperature(), dim=-1)  # pi [G, n_R]
        hard = F.one_hot(soft.argmax(dim=-1), len(self.candidate_ranks)).to(soft.dtype)
        straight_through = hard - soft.detach() + soft
        nested = torch.stack([self.prefix_mask(rank) for rank in self.candidate_ranks])  # [n_R, r]: rows c_k
        self._soft_probs = soft
        return straight_through @ nested  # [G, r]

    def rows_for_layers(self, rows: Any) -> list[Any]:
        """One entry per adapted layer from G selector rows: row i for layer i, or the one row for all (global)."""
        return list(rows) if len(rows) > 1 else [rows[0]] * len(self.layers)

    def _set_layer_masks(self, masks: torch.Tensor) -> None:
        """Give each layer its mask row [G, r]."""
        for layer, mask in zip(self.layers.values(), self.rows_for_layers(masks)):
            layer.rank_mask = mask

    @torch.no_grad()
    def base_features(self, task: Task) -> torch.Tensor:
        """Pooled features of up to n_H training inputs (seeded draw) with adapters and prompt bypassed [n, d]."""
        assert self.model is not None
        generator = derived_generator(self.context.seed, task.index)
        count = min(self.options.complexity_samples, len(task.train))
        indices = torch.randperm(len(task.train), generator=generator)[:count].tolist()
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = []
            batch_size = self.context.train.eval_batch_size
            device = self.state.drs_bias.device
            for start in range(0, count, batch_size):
                inputs = self.model.collate(task.train, indices[start : start + batch_size], task, train=False)
                with self.adapters_bypassed():
                    chunks.append(self.model.features({key: value.to(device) for key, value in inputs.items()}).float())
        finally:
            self.model.train(was_training)
        return torch.cat(chunks)

    def export_refusal(self) -> str | None:
        if self.state.prompt is not None:
            return "its meta-prompt adds learned tokens to every input, which no LoRA can express (prompt_len: 0 exports)"
        return super().export_refusal()

    @contextmanager
    def adapters_bypassed(self) -> Iterator[None]:
        """The frozen model: every F-LoRA delta (the base class) and the meta-prompt off."""
        prompt = self.state.prompt
        active = prompt.active if prompt is not None else None
        if prompt is not None:
            prompt.active = False
        try:
            with super().adapters_bypassed():
                yield
        finally:
            if prompt is not None:
                prompt.active = active

    @contextmanager
    def serving_as_of(self, task_index: int) -> Iterator[None]:
        """routed_cores: every layer's K replaced by the sum of the kept cores of tasks up to `task_index` (as_of_task)
        or by that task's alone (own_task), a live later task's cores hidden, then all restored."""
        mode = self.options.routed_cores
        if mode == "off":
            yield
            return
        if any(layer.merged for layer in self.layers.values()):
            raise RuntimeError("routed_cores rebuilds K per routed task: unmerge the adapters first")
        keep = (lambda index: index <= task_index) if mode == "as_of_task" else (lambda index: index == task_index)
        keys = [key for key in self.trained_task_names if keep(int(key))]
        live_is_later = self.current_task is not None and self.current_task.index > task_index
        saved = [(layer.accumulated_core.clone(), layer.core_M, layer.core_N) for layer in self.layers.values()]
        try:
            with torch.no_grad():
                for layer in self.layers.values():
                    as_of = torch.zeros_like(layer.accumulated_core)
                    for key in keys:
                        as_of += layer.kept_task_core(key)
                    layer.accumulated_core.copy_(as_of)
                    if live_is_later and layer.task_live:  # a task trained after the routed one: not its model
                        layer.core_M, layer.core_N = None, None
            yield
        finally:
            with torch.no_grad():
                for layer, (core, live_M, live_N) in zip(self.layers.values(), saved):
                    layer.accumulated_core.copy_(core)
                    layer.core_M, layer.core_N = live_M, live_N

    def measure_task(self, task: Task) -> dict[str, Any]:
        """H(T_t) = clip(w_spec h_spec + w_sim h_sim, 0, 1); stores the task's feature basis U_t as a buffer."""
        options = self.options
        features = self.base_features(task)
        h_spec, eigenvectors = spectral_complexity(features)
        basis = eigenvectors[:, : min(options.similarity_dim, eigenvectors.shape[1])].float().contiguous()  # [d, k_sim]
        earlier = [value for key, value in self.state.similarity_bases.named_buffers() if key != f"U_{task.index}"]
        overlap = max((subspace_overlap(basis, other) for other in earlier if other.numel()), default=0.0)
        h_sim = 1.0 - overlap if earlier else 1.0
        combined = min(1.0, max(0.0, options.spectral_weight * h_spec + options.similarity_weight * h_sim))
        self.state.similarity_bases.register_buffer(f"U_{task.index}", basis.to(self.state.drs_bias.device))
        return {"task": task.name, "h_spec": h_spec, "h_sim": h_sim, "H": combined}

    # ----- lifecycle ---------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Grow the head, start M_t = I, N_t = 0 in every layer, snapshot the prompt anchor, set the trainable set."""
        assert self.model is not None
        head = getattr(self.model, "head", None)  # a language model has no head rows to initialise
        old_rows = len(head.weights) if head is not None else 0
        super().begin_task(task)
        if self.options.head_init == "zero" and head is not None:
            new_rows = list(self.model.head.biases)[old_rows:]
            if self.model.head.cosine_scale is None:  # a cosine row needs a direction: zero would normalise to 0/0
                new_rows += list(self.model.head.weights)[old_rows:]
            with torch.no_grad():
                for parameter in new_rows:
                    parameter.zero_()
        learn_bases = self._bases_train_now()
        identity_cores = self._learning_bases_from_zero()
        for layer in self.layers.values():
            layer.start_task_cores(identity_both=identity_cores)
            for core in layer.live_cores():
                core.requires_grad_(not identity_cores)
            layer.shared_A.requires_grad_(learn_bases)
            layer.shared_B.requires_grad_(learn_bases)
        self.state.drs_bias.requires_grad_(False)
        prompt = self.state.prompt
        if prompt is not None:
            prompt.requires_grad_(True)
            self.prompt_anchor = prompt.prompts.detach().clone()
        self.step = 0
        self._noise = derived_generator(self.context.seed, task.index)

    def prepare_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """H(T_t) from base features; the step count S that the temperature schedule and commit phase use."""
        if self.options.drs != "off":
            self.complexity.append(self.measure_task(task))
        else:
            self.complexity.append({"task": task.name, "h_spec": None, "h_sim": None, "H": None})
        train = self.context.train
        batches = math.ceil(len(task.train) / train.batch_size)
        self.total_steps = max(1, math.ceil(batches / train.gradient_accumulation_steps) * train.epochs)
        self.state.drs_bias.requires_grad_(self._drs_mode() == "gumbel")

    def parameter_groups(self, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
        """The base groups, with the DRS bias moved to its own group at lr x drs_lr_multiplier."""
        groups = super().parameter_groups(lr, head_lr)
        bias = self.state.drs_bias
        if not bias.requires_grad:
            return groups
        for group in groups:
            group["params"] = [parameter for parameter in group["params"] if parameter is not bias]
        groups = [group for group in groups if group["params"]]
        return groups + [{"params": [bias], "lr": lr * self.options.drs_lr_multiplier}]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Sample this step's rank masks, hand them to the layers (one shared, or one per layer), run the model."""
        assert self.model is not None
        masks = self.sample_mask()
        self._set_layer_masks(masks)
        return self.model(batch)

    def extra_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        """lambda_rank sum_k pi_k rho_k + lambda_P ||P - P_prev||^2 (+ lambda_orth core overlap)."""
        options = self.options
        terms = []
        if self._soft_probs is not None and options.rank_loss_weight > 0:
            rho = torch.tensor(self.candidate_ranks, dtype=self._soft_probs.dtype, device=self._soft_probs.device) / options.rank
            terms.append(options.rank_loss_weight * (self._soft_probs * rho).sum(dim=-1).mean())  # mean over groups
        prompt = self.state.prompt
        if prompt is not None and options.prompt_anchor_weight > 0 and not self._first_trained_task():
            terms.append(options.prompt_anchor_weight * (prompt.prompts - self.prompt_anchor).pow(2).sum())
        if options.core_orth_weight > 0 and self.trained_task_names:
            terms.append(options.core_orth_weight * self.core_overlap())
        return torch.stack(terms).sum() if terms else None

    def core_overlap(self) -> torch.Tensor:
        """L_orth = sum over layers and earlier tasks of ||(D(m) M_t)(D(m_tau) M_tau)^T||_F^2."""
        total = torch.zeros((), device=self.state.drs_bias.device)
        for layer in self.layers.values():
            live = layer.core_M * layer.rank_mask[:, None]
            for key in self.trained_task_names:
                total = total + (live @ getattr(layer.kept_cores, f"M_{key}").T).pow(2).sum()
        return total

    def after_step(self) -> None:
        self.step += 1

    def end_task(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """Commit r_t, fold the cores into K, update the meta-prompt (Reptile step), freeze what is done."""
        ranks = self.committed_ranks()
        key = str(task.index)
        for layer, rank in zip(self.layers.values(), self.rows_for_layers(ranks)):
            layer.fold_task_cores(key, rank, keep=self.options.keep_task_cores)
            layer.shared_A.requires_grad_(False)
            layer.shared_B.requires_grad_(False)
        self.state.drs_bias.requires_grad_(False)
        prompt = self.state.prompt
        if prompt is not None and self.prompt_anchor is not None:
            with torch.no_grad():
                prompt.prompts.copy_(self.prompt_anchor + self.options.meta_step * (prompt.prompts - self.prompt_anchor))
            prompt.requires_grad_(False)
        self.chosen_ranks.append(ranks[0] if self.options.drs_granularity == "global" else ranks)
        if self.options.keep_task_cores:
            self.trained_task_names.append(key)
        self._soft_probs = None
        super().end_task(task, train_loader)

    def absorb_base_session(self, task: Task, train_loader: Iterable[dict[str, Any]]) -> None:
        """A base-session task 0 trained the backbone: keep its feature basis so task 1's novelty sees it."""
        super().absorb_base_session(task, train_loader)
        if self.options.drs != "off":
            self.measure_task(task)

    def restore_structure(self, finished_tasks: list[Task], base_session: bool = False) -> None:
        """Head rows, kept-core and U_t placeholders for finished tasks; load_state_dict fills them."""
        assert self.model is not None
        for task in finished_tasks:
            self.model.restore_task(task, self.context, from_base_session=True)  # the rows only; weights are loaded
            self.current_task = task
            self.seen_tasks.append(task)
            trained = not (task.index == 0 and base_session)
            if trained and self.options.keep_task_cores:
                for layer in self.layers.values():
                    layer.add_kept_core_placeholders(str(task.index))
            if self.options.drs != "off":
                self.state.similarity_bases.register_buffer(f"U_{task.index}", torch.zeros(0))
        if self.model.has_class_head:
            self.model.head.freeze_all()
        for layer in self.layers.values():
            layer.shared_A.requires_grad_(False)
            layer.shared_B.requires_grad_(False)
        if self.state.prompt is not None:
            self.state.prompt.requires_grad_(False)

    # ----- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        """No task id: every layer applies W0 + s B K A (plus the live task under its committed mask, if any)."""
        if any(layer.task_live for layer in self.layers.values()):
            self._set_layer_masks(self.committed_masks())
        return super().score(batch)

    # ----- reporting ---------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {
            "chosen_ranks": list(self.chosen_ranks),
            "complexity": [dict(entry) for entry in self.complexity],
            "trained_task_names": list(self.trained_task_names),
            "candidate_ranks": list(self.candidate_ranks),
            "drs_bias": self.state.drs_bias.detach().cpu().tolist(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.chosen_ranks = list(state.get("chosen_ranks", []))
        self.complexity = [dict(entry) for entry in state.get("complexity", [])]
        self.trained_task_names = list(state.get("trained_task_names", []))

    def task_metrics(self) -> dict[str, Any]:
        """The chosen rank r_t and H(T_t) per trained task, and the per-task parameter formula's numbers."""
        return {
            **super().task_metrics(),
            "chosen_ranks": {
                entry["task"]: rank if isinstance(rank, int) else dict(zip(self.layers, rank))
                for entry, rank in zip(self.complexity, self.chosen_ranks)
            },
            "complexity": {
                entry["task"]: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items() if k != "task"}
                for entry in self.complexity
            },
            "candidate_ranks": list(self.candidate_ranks),
            "core_params_per_task": sum(layer.task_parameter_count() for layer in self.layers.values()),
            "adapted_layers": len(self.layers),
        }
