"""ICM-Fusion (arXiv 2508.04153): fuse task LoRAs through task vectors, a fusion VAE and in-context meta-training.

Phases (spec section 4): flatten every weight sample (checkpoints of each task's LoRA) -> task vectors ->
F-VAE warm start as a plain CVAE (ICM-LoRA's training) -> meta phase (Algorithm 1: decode, K first-order
in-context steps on the task's few examples, re-encode, decode, MSE to the real LoRA + KL) -> fusion rule
(posterior means, weighted latent and task-vector arithmetic, decode, de-normalise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from loracl.adapters.peft_io import LoraPair
from loracl.config import Float, StrictModel
from loracl.errors import LoraclError
from loracl.fusion.adapters import delta_weights
from loracl.fusion.flat import (
    FlatLayout,
    TensorStats,
    flat_gradient,
    flatten,
    full_rank_view,
    tensor_stats,
    truncated_lora,
    unflatten,
)
from loracl.fusion.host import LoraHost, TaskSupport
from loracl.fusion.vae import FusionVAE, cvae_loss, kl_divergence
from loracl.seeding import seeded_rng

Adapter = dict[str, LoraPair]


class IcmFusionOptions(StrictModel):
    """ICM-Fusion knobs; [C] ICM-LoRA code, [A] the paper's Algorithm 1 as transcribed, [D] ours (spec 6, 8)."""

    task_vector: Literal["features", "parameters"] = Field(
        default="features",
        description="The condition v_i of each task: `features` = the mean-pooled last hidden state over the task's examples with its "
        "LoRA active (what the authors' ICM-LoRA code uses); `parameters` = per module the mean |ΔW| and the top-r "
        "singular values of ΔW (the data-free variant). Source: our design (not in the paper or code), after the "
        "ICM-LoRA code (`features`) and the paper's Algorithm 1 as transcribed (`parameters`).",
    )
    target: Literal["factors", "delta"] = Field(
        default="factors",
        description="What the F-VAE encodes: `factors` = the LoRA factors (A, B), ICM-LoRA's encoding; `delta` = each module's whole "
        "update ΔW = s·B·A (Linear LoRAs only; no factor ambiguity between tasks), cut back to rank `delta_rank` by SVD. "
        "The flat vector is then d_out·d_in per module instead of r·(d_in + d_out), and an F-VAE step costs about that "
        "much more. Source: our design (not in the paper or code).",
    )
    delta_rank: int | None = Field(
        default=None,
        ge=1,
        description="`target: delta` only: the rank of the SVD cut of the decoded ΔW; null = the adapters' r (in the stream method it "
        "must equal the branch rank). Source: our design (not in the paper or code).",
    )
    latent_dim: int = Field(
        default=256,
        ge=1,
        description="Latent size of the F-VAE. Source: official code (ICM-LoRA's, the authors' precursor).",
    )
    channel_divisor: int = Field(
        default=1,
        ge=1,
        description="1 = ICM-LoRA's conv widths; k thins every conv layer of the F-VAE k-fold (for small budgets). Source: our design "
        "(not in the paper or code).",
    )
    kl_weight: Float = Field(
        default=0.005,
        ge=0.0,
        description="λ_KL, the weight of the KL term in the F-VAE loss. Source: official code (ICM-LoRA's, the authors' precursor).",
    )
    normalisation: Literal["shared", "per_sample"] = Field(
        default="shared",
        description="How weight vectors are z-scored per tensor: `shared` = one set of statistics for every weight sample (a fused "
        "vector has no statistics of its own); `per_sample` = ICM-LoRA's round trip (fusion then de-normalises with the "
        "mean of the final LoRAs' statistics). Source: our design (not in the paper or code).",
    )
    centre: bool = Field(
        default=False,
        description="Subtract the pooled weight samples' mean vector (per position) after z-scoring and add it back after decoding, "
        "so the F-VAE models what differs between the LoRAs (per-task LoRAs from one init seed share their barely-trained "
        "A factors, a fixed random pattern a conv decoder cannot reproduce); needs `normalisation: shared`. Source: our "
        "design (not in the paper or code).",
    )
    warm_start_steps: int = Field(
        default=300,
        ge=0,
        description="Plain-CVAE training steps (no in-context steps) before the meta phase. Source: our design (not in the paper or "
        "code).",
    )
    meta_steps: int = Field(
        default=30,
        ge=0,
        description="Outer steps of the meta phase (the paper's Algorithm 1). Source: our design (not in the paper or code).",
    )
    batch_size: int = Field(
        default=16,
        ge=2,
        description="Weight samples per warm-start VAE step (tasks drawn uniformly, then a sample). Source: our design (not in the "
        "paper or code).",
    )
    meta_batch_size: int = Field(
        default=4,
        ge=2,
        description="Tasks (drawn with replacement) per meta step. Source: our design (not in the paper or code).",
    )
    inner_steps: int = Field(
        default=2,
        ge=0,
        description="K, the in-context steps l ← l − β·∇_l L_task on the task's few examples inside each meta step. Source: our "
        "design (not in the paper or code).",
    )
    inner_lr: Float = Field(
        default=1e-3,
        gt=0.0,
        description="β, the in-context step size, on the normalised scale. Source: our design (not in the paper or code).",
    )
    outer_lr: Float = Field(
        default=1e-3,
        gt=0.0,
        description="γ, the F-VAE's AdamW learning rate in the meta phase. Source: our design (not in the paper or code).",
    )
    meta_gradient: Literal["first_order"] = Field(
        default="first_order",
        description="The meta gradient stops at the in-context-adapted LoRA (first order); second order is not implemented. Source: "
        "our design (not in the paper or code).",
    )
    align_weight: Float = Field(
        default=0.0,
        ge=0.0,
        description="Ablation only: λ of a latent alignment term λ·‖μ(l, v) − μ(l_adapt, v)‖² between a real LoRA's code and its "
        "in-context-adapted decode's; needs `inner_steps` > 0. Source: our design (not in the paper or code).",
    )
    fusion_weights: Literal["uniform", "learned"] = Field(
        default="uniform",
        description="The weights w_i of the fusion z_f = Σ w_i z_i, v_f = Σ w_i v_i: `uniform` = 1/T; `learned` = softmax weights "
        "fitted by Adam on the summed few-shot loss through the frozen decoder. Source: our design (not in the paper or "
        "code).",
    )
    learned_weight_steps: int = Field(
        default=50,
        ge=1,
        le=50,
        description="`fusion_weights: learned`: the Adam steps (at most 50). Source: our design (not in the paper or code).",
    )
    learned_weight_lr: Float = Field(
        default=0.05,
        gt=0.0,
        description="`fusion_weights: learned`: the Adam learning rate. Source: our design (not in the paper or code).",
    )
    balance_directions: bool = Field(
        default=False,
        description="Give the task vectors equal norms before the weighted sum (our eq. 16'). Source: our design (not in the paper or "
        "code).",
    )
    refine_steps: int = Field(
        default=0,
        ge=0,
        description="In-context steps on the fused LoRA over the union of the tasks' examples (our eq. 18). Source: our design (not "
        "in the paper or code).",
    )
    noise_std: Float = Field(
        default=0.01,
        ge=0.0,
        description="Standard deviation of the jitter with which tasks with fewer than `min_samples` weight samples are topped up "
        "(0: no top-up at all, so `min_samples` has no effect). Source: our design (not in the paper or code).",
    )
    min_samples: int = Field(
        default=5,
        ge=1,
        description="Weight samples per task below which jittered copies are added. Source: our design (not in the paper or code).",
    )
    seed: int = Field(
        default=0,
        description="Seed of the fusion's own random draws (task and sample order, jitter, the VAE's noise). Source: our design (not "
        "in the paper or code).",
    )
    inert_defaults: ClassVar[dict[str, Any]] = {"centre": False, "target": "factors", "delta_rank": None, "align_weight": 0.0}

    @model_validator(mode="after")
    def _check_combinations(self) -> IcmFusionOptions:
        if self.centre and self.normalisation != "shared":
            raise ValueError("`centre` needs normalisation `shared` (one offset for every weight sample)")
        if self.delta_rank is not None and self.target != "delta":
            raise ValueError("`delta_rank` is the rank of the SVD cut of target `delta`: set target: delta")
        if self.align_weight > 0 and self.inner_steps == 0:
            raise ValueError("`align_weight` compares latents before and after in-context steps: needs inner_steps > 0")
        return self


@dataclass
class FusionTask:
    """One task to fuse: its final LoRA, its weight samples (checkpoints; may be empty) and its few examples."""

    name: str
    final: Adapter
    support: TaskSupport
    samples: list[Adapter] = field(default_factory=list)


@dataclass
class IcmFusionResult:
    adapter: Adapter
    report: dict[str, Any]
    vae: FusionVAE
    task_vectors: torch.Tensor  # [T, d_v]
    latents: torch.Tensor  # [T, d_z]
    stats: TensorStats
    layout: FlatLayout
    task_stats: list[TensorStats]  # each task's final LoRA was encoded with these (shared: all equal to stats)
    output_ranks: dict[str, int] | None = None  # target delta: each module's rank after the SVD cut
    output_scalings: dict[str, float] | None = None  # target delta: each module's scaling, as in the input LoRAs

    def decoded_task_adapters(self) -> list[Adapter]:
        """Each task's own posterior mean decoded under its own condition and de-normalised with the statistics it
        was encoded with: how well the F-VAE reproduces the LoRAs it fuses."""
        with torch.no_grad():
            flats = self.vae.decode(self.latents, self.task_vectors)  # [T, N_pad]
        flats[:, self.layout.numel :] = 0.0
        return [
            lora_of_decoded(unflatten(self.layout, flat, stats), self.output_ranks, self.output_scalings)
            for flat, stats in zip(flats, self.task_stats)
        ]


def lora_of_decoded(decoded: Adapter, ranks: dict[str, int] | None, scalings: dict[str, float] | None) -> Adapter:
    """A decoded adapter as a LoRA of the inputs' form, on the CPU; a decoded full-rank view (target delta, `ranks`
    given) is cut to each module's rank by SVD of its dW = B (A is the identity, s = 1)."""
    if ranks is not None and scalings is not None:
        decoded = truncated_lora({module: pair.lora_B for module, pair in decoded.items()}, ranks, scalings)
    return {module: LoraPair(p.lora_A.cpu().contiguous(), p.lora_B.cpu().contiguous(), p.scaling) for module, p in decoded.items()}


def adapter_on(adapter: Adapter, device: torch.device) -> Adapter:
    """The same LoRA with its tensors on `device`."""
    return {module: LoraPair(p.lora_A.to(device), p.lora_B.to(device), p.scaling) for module, p in adapter.items()}


def parameter_task_vector(adapter: Adapter) -> torch.Tensor:
    """Eq. (3b) compressed [D]: per module, mean |delta W| and the leading r singular values of delta W (a conv
    LoRA's delta W as the matrix [c_out, c_in kh kw], the shape its merged kernel flattens to)."""
    parts = []
    deltas = delta_weights(adapter)
    for module in sorted(adapter):
        delta = deltas[module]
        rank = adapter[module].lora_A.shape[0]
        parts += [delta.abs().mean().reshape(1), torch.linalg.svdvals(delta)[:rank]]
    return torch.cat(parts)


class IcmFusion:
    """Trains the F-VAE on the tasks' weight samples and decodes one fused LoRA."""

    def __init__(self, options: IcmFusionOptions, host: LoraHost | None) -> None:
        self.options = options
        self.host = host
        if host is None and (options.task_vector == "features" or options.inner_steps or options.refine_steps or options.fusion_weights == "learned"):
            raise LoraclError(
                "icm fusion without a base model and examples needs task_vector=parameters, inner_steps=0, "
                "refine_steps=0 and fusion_weights=uniform (the data-free mode)"
            )
        self.generator = torch.Generator().manual_seed(options.seed)  # CPU draws: the same order on any device
        self.device = host.device if host is not None else torch.device("cpu")

    # ----- data --------------------------------------------------------------------------------------
    def task_vectors(self, tasks: list[FusionTask]) -> torch.Tensor:
        if self.options.task_vector == "parameters":
            return torch.stack([parameter_task_vector(task.final) for task in tasks])
        assert self.host is not None
        return torch.stack([self.host.task_vector(task.final, task.support.inputs) for task in tasks])

    def weight_data(
        self, tasks: list[FusionTask], layout: FlatLayout
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], TensorStats, list[list[TensorStats]] | None]:
        """Flat samples per task [n_i, N_pad], the flat final LoRAs [N_pad], the stats used to decode a fused
        vector, and under per_sample each row's own stats (per task, in row order; a jittered row has its
        source's), the stats that turn that row back into its LoRA (None under shared: every row uses the first)."""
        pooled = [sample for task in tasks for sample in [task.final, *task.samples]]
        shared = tensor_stats(layout, pooled)
        if self.options.centre:
            offset = torch.stack([flatten(layout, sample, shared)[0] for sample in pooled]).mean(0)
            shared = TensorStats(shared.mean, shared.std, offset)
        per_sample = self.options.normalisation == "per_sample"
        per_task, finals, row_stats = [], [], []
        for task in tasks:
            encoded = [flatten(layout, sample, None if per_sample else shared) for sample in [*task.samples, task.final]]
            flats = [flat for flat, _ in encoded]
            stats_of_rows = [stats for _, stats in encoded]
            stack = torch.stack(flats)
            if len(flats) < self.options.min_samples and self.options.noise_std > 0:
                jitter = torch.randn((self.options.min_samples - len(flats), layout.padded), generator=self.generator).to(stack.device)
                sources = torch.arange(len(jitter)) % len(flats)
                noisy = stack[sources] + self.options.noise_std * jitter
                noisy[:, layout.numel :] = 0.0  # the padding stays zero
                stack = torch.cat([stack, noisy])
                stats_of_rows += [stats_of_rows[source] for source in sources.tolist()]
            per_task.append(stack)
            finals.append(flats[-1])
            row_stats.append(stats_of_rows)
        if self.options.normalisation == "per_sample":
            # a fused vector has no own statistics: decode with the mean of the final LoRAs' statistics [D]
            own_stats = [tensor_stats(layout, [task.final]) for task in tasks]
            shared = TensorStats(torch.stack([s.mean for s in own_stats]).mean(0), torch.stack([s.std for s in own_stats]).mean(0))
        return per_task, finals, shared, (row_stats if per_sample else None)

    def draw(self, per_task: list[torch.Tensor], count: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Tasks uniformly (long-tail: tail tasks are seen as often as head tasks), then a sample uniformly;
        returns the task ids, each drawn row's index within its task, and the rows."""
        task_ids = torch.randint(len(per_task), (count,), generator=self.generator)
        indices = [int(torch.randint(len(per_task[t]), (1,), generator=self.generator)) for t in task_ids.tolist()]
        rows = [per_task[t][index : index + 1] for t, index in zip(task_ids.tolist(), indices)]
        return task_ids, indices, torch.cat(rows)

    # ----- training ----------------------------------------------------------------------------------
    def in_context_adapt(self, flat: torch.Tensor, support: TaskSupport, layout: FlatLayout, stats: TensorStats, steps: int) -> torch.Tensor:
        """Eq. (8): K plain gradient steps on the task loss w.r.t. the flat vector (first order: no graph kept)."""
        assert self.host is not None
        flat = flat.detach().clone()
        for _ in range(steps):
            _, grads = self.host.loss_and_grads(unflatten(layout, flat, stats), support)
            flat = flat - self.options.inner_lr * flat_gradient(layout, grads, stats)
        return flat

    def meta_loss(
        self,
        vae: FusionVAE,
        targets: torch.Tensor,
        conditions: torch.Tensor,
        supports: list[TaskSupport],
        layout: FlatLayout,
        stats: TensorStats | list[TensorStats],
    ) -> torch.Tensor:
        """Eqs. (6)-(12); with K = 0 it is the plain CVAE loss on the real samples (ICM-LoRA, invariant 9).
        `stats`: one TensorStats for every row, or one per row (per_sample: each target's own, so the in-context
        steps take the task gradient on the LoRA that row's decoding stands for)."""
        if self.options.inner_steps == 0:
            reconstruction, mean, logvar = vae(targets, conditions)
            return cvae_loss(targets, reconstruction, mean, logvar, self.options.kl_weight)
        with torch.no_grad():  # first order: (6)-(7) get no gradient, they only produce l_init
            initial = vae.decode(vae.sample(*vae.encode(targets, conditions)), conditions)
        row_stats = stats if isinstance(stats, list) else [stats] * len(supports)
        adapted = torch.stack(
            [self.in_context_adapt(initial[i], supports[i], layout, row_stats[i], self.options.inner_steps) for i in range(len(supports))]
        )
        adapted[:, layout.numel :] = 0.0
        mean, logvar = vae.encode(adapted, conditions)  # (9)
        reconstruction = vae.decode(vae.sample(mean, logvar), conditions)  # (10)
        loss = torch.nn.functional.mse_loss(reconstruction, targets) + self.options.kl_weight * kl_divergence(mean, logvar)
        if self.options.align_weight > 0:  # G8 [D], as the spec writes it: both codes get the gradient
            real_mean, _ = vae.encode(targets, conditions)
            loss = loss + self.options.align_weight * (real_mean - mean).pow(2).sum(dim=1).mean()
        return loss

    def train(
        self,
        vae: FusionVAE,
        per_task: list[torch.Tensor],
        vectors: torch.Tensor,
        tasks: list[FusionTask],
        layout: FlatLayout,
        stats: TensorStats,
        row_stats: list[list[TensorStats]] | None = None,
    ) -> dict[str, float]:
        """Warm start (plain CVAE) then the meta phase; returns the last losses. `row_stats` (per_sample): each
        row's own statistics, which its in-context steps de-normalise with instead of `stats`."""
        optimizer = torch.optim.AdamW(vae.parameters(), lr=self.options.outer_lr, weight_decay=0.0)
        vae.train()
        losses = {"warm_start_loss": float("nan"), "meta_loss": float("nan")}
        with seeded_rng(self.options.seed):  # the reparameterisation noise may come from a GPU's generator
            for _ in range(self.options.warm_start_steps):
                task_ids, _, targets = self.draw(per_task, self.options.batch_size)
                reconstruction, mean, logvar = vae(targets, vectors[task_ids])
                loss = cvae_loss(targets, reconstruction, mean, logvar, self.options.kl_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses["warm_start_loss"] = float(loss.detach())
            for _ in range(self.options.meta_steps):
                task_ids, indices, targets = self.draw(per_task, self.options.meta_batch_size)
                supports = [tasks[t].support for t in task_ids.tolist()]
                drawn_stats: TensorStats | list[TensorStats] = stats
                if row_stats is not None:
                    drawn_stats = [row_stats[t][index] for t, index in zip(task_ids.tolist(), indices)]
                loss = self.meta_loss(vae, targets, vectors[task_ids], supports, layout, drawn_stats)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses["meta_loss"] = float(loss.detach())
        vae.eval()
        return losses

    # ----- fusion ------------------------------------------------------------------------------------
    def fused_condition(self, vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. (16) (with (16') when balance_directions): v_f = sum_i w_i v_i."""
        if self.options.balance_directions:
            norms = vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
            vectors = vectors / norms * norms.mean()
        return (weights[:, None] * vectors).sum(0)

    def decode_fused(self, vae: FusionVAE, latents: torch.Tensor, vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eqs. (17)-(18): l_f = D([sum w_i z_i; v_f])."""
        latent = (weights[:, None] * latents).sum(0, keepdim=True)
        return vae.decode(latent, self.fused_condition(vectors, weights)[None])[0]

    def learn_weights(
        self, vae: FusionVAE, latents: torch.Tensor, vectors: torch.Tensor, tasks: list[FusionTask], layout: FlatLayout, stats: TensorStats
    ) -> torch.Tensor:
        """[D] G1: softmax weights minimising the summed few-shot loss through the frozen decoder."""
        assert self.host is not None
        logits = torch.zeros(len(tasks), device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=self.options.learned_weight_lr)
        for parameter in vae.parameters():
            parameter.requires_grad_(False)
        for _ in range(self.options.learned_weight_steps):
            flat = self.decode_fused(vae, latents, vectors, torch.softmax(logits, 0))
            adapter = unflatten(layout, flat.detach(), stats)
            gradient = torch.zeros_like(flat)
            for task in tasks:
                _, grads = self.host.loss_and_grads(adapter, task.support)
                gradient += flat_gradient(layout, grads, stats)
            optimizer.zero_grad(set_to_none=True)
            flat.backward(gradient)  # chain rule: d loss / d logits through the decoder
            optimizer.step()
        for parameter in vae.parameters():
            parameter.requires_grad_(True)
        return torch.softmax(logits.detach(), 0)

    def fuse(self, tasks: list[FusionTask]) -> IcmFusionResult:
        """Train the F-VAE on the tasks' weight data and decode the fused LoRA (spec section 4, phases 0-2)."""
        if not tasks:
            raise LoraclError("no tasks to fuse")
        started = time.perf_counter()
        tasks = [FusionTask(task.name, adapter_on(task.final, self.device), task.support, [adapter_on(s, self.device) for s in task.samples]) for task in tasks]
        vectors = self.task_vectors(tasks)  # from the LoRAs as given, whatever the F-VAE encodes
        output_ranks = output_scalings = None
        delta = self.options.target == "delta"
        if delta:
            first = tasks[0].final
            output_ranks = {module: self.options.delta_rank or pair.lora_A.shape[0] for module, pair in first.items()}
            output_scalings = {module: pair.scaling for module, pair in first.items()}
            identities: dict[tuple, torch.Tensor] = {}  # one I per width, shared by every view
            tasks = [FusionTask(t.name, full_rank_view(t.final, identities), t.support, [full_rank_view(s, identities) for s in t.samples]) for t in tasks]
        layout = FlatLayout.of(tasks[0].final, identity_down=delta)
        per_task, finals, stats, row_stats = self.weight_data(tasks, layout)
        with seeded_rng(self.options.seed):
            vae = FusionVAE(layout.padded, vectors.shape[1], self.options.latent_dim, self.options.channel_divisor)
        vae.to(self.device)
        losses = self.train(vae, per_task, vectors, tasks, layout, stats, row_stats)
        with torch.no_grad():
            latents, _ = vae.encode(torch.stack(finals), vectors)  # (15): posterior means
        if self.options.fusion_weights == "learned":
            weights = self.learn_weights(vae, latents, vectors, tasks, layout, stats)
        else:
            weights = torch.full((len(tasks),), 1.0 / len(tasks), device=self.device)
        with torch.no_grad():
            flat = self.decode_fused(vae, latents, vectors, weights)
        flat[layout.numel :] = 0.0
        for _ in range(self.options.refine_steps):
            adapter = unflatten(layout, flat, stats)
            gradient = torch.zeros_like(flat)
            for task in tasks:
                _, grads = self.host.loss_and_grads(adapter, task.support)
                gradient += flat_gradient(layout, grads, stats) / len(tasks)
            flat = flat - self.options.inner_lr * gradient
        # stored and exported from the CPU, wherever it was fused
        adapter = lora_of_decoded(unflatten(layout, flat.detach(), stats), output_ranks, output_scalings)
        with torch.no_grad():
            reconstruction = vae.decode(latents, vectors)
            reconstruction_mse = float(torch.nn.functional.mse_loss(reconstruction[:, : layout.numel], torch.stack(finals)[:, : layout.numel]))
        vae_params = sum(p.numel() for p in vae.parameters())
        report = {
            "method": "icm",
            "target": self.options.target,
            "fusion_weights": [round(float(w), 4) for w in weights],
            "weight_samples_per_task": [len(p) for p in per_task],
            "lora_params": layout.numel,
            "padded_length": layout.padded,
            "vae_params": vae_params,
            "task_vector_dim": int(vectors.shape[1]),
            "final_reconstruction_mse": reconstruction_mse,
            "storage_floats": vae_params
            + vectors.numel()
            + 2 * len(layout.keys)
            + layout.numel
            + (layout.numel if stats.offset is not None else 0),  # invariant 11, plus the centring offset (0 on padding)
            "final_target_mean_square": float(torch.stack(finals)[:, : layout.numel].pow(2).mean()),  # MSE of a zero output
            "fusion_s": time.perf_counter() - started,
            **losses,
        }
        if self.options.normalisation == "per_sample":
            task_stats = [tensor_stats(layout, [task.final]) for task in tasks]
        else:
            task_stats = [stats] * len(tasks)
        return IcmFusionResult(adapter, report, vae, vectors, latents, stats, layout, task_stats, output_ranks, output_scalings)
