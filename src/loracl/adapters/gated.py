"""Gated bottleneck adapters (OA-Adapter): one W2 · diag(γ) · W1 branch per task on a frozen nn.Linear.

Each branch is a bias-free linear bottleneck whose middle is a diagonal mask
    γ = soft(g; τ) = sign(g) · max(|g| - τ, 0)          g: trainable gate [r], τ: trainable threshold (scalar)
so a branch's effective rank r_eff = |{i : |g_i| > τ}| is learned with the task loss. After its task a branch
is pruned to its active dimensions (exact: inactive ones contribute 0) and frozen. All branches are summed:
    y = W0 x + b0 + Σ_k scaling · W2_k diag(γ_k) W1_k drop(x)
The layer knows nothing of tasks or heads; the method decides which branch trains, prunes and freezes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loracl.adapters.base import MultiBranchLayer
from loracl.errors import LoraclError


def soft_threshold(gate: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """sign(g) · max(|g| - τ, 0), element-wise, differentiable in both g and τ.

    torch's softshrink takes τ as a Python float, so it cannot learn the threshold; this is the same formula
    written with autograd-friendly ops. Gradients: dγ/dg = 1 and dγ/dτ = -sign(g) on active entries, 0 elsewhere
    (relu's gradient at 0 is 0, so |g| = τ counts as inactive).
    """
    return torch.sign(gate) * F.relu(gate.abs() - threshold)


class GatedBranch(nn.Module):
    """One task's adapter at one site: down W1 [r, d_in], up W2 [d_out, r], gate g [r], threshold τ []."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        gate_init: float = 1e-2,
        threshold: nn.Parameter | None = None,
        tau_init: float = 1e-3,
        scaling: float = 1.0,
        init: str = "kaiming",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise LoraclError(f"gated adapter rank must be >= 1, got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.scaling = scaling
        self.down = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.up = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.gate = nn.Parameter(torch.full((rank,), float(gate_init), **factory))
        # A shared τ (layer or global scope) is one Parameter object handed to several branches.
        self.threshold = threshold if threshold is not None else nn.Parameter(torch.tensor(float(tau_init), **factory))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # PEFT's LoRA-A default
        elif init == "gaussian":
            nn.init.normal_(self.down, std=1.0 / rank)
        else:
            raise LoraclError(f"unknown gated adapter init {init!r}: use kaiming or gaussian")

    @property
    def rank(self) -> int:
        """Current bottleneck width (r_max before pruning, r_eff after)."""
        return self.gate.shape[0]

    def gamma(self) -> torch.Tensor:
        """The diagonal mask γ [r]."""
        return soft_threshold(self.gate, self.threshold)

    def active_mask(self) -> torch.Tensor:
        """Boolean [r]: dimensions with a non-zero mask value."""
        return self.gamma().detach() != 0

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    def r_eff(self) -> int:
        return int(self.active_mask().sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """scaling · W2 diag(γ) W1 x for an already dropped-out input x [..., d_in] -> [..., d_out]."""
        hidden = F.linear(x, self.down) * self.gamma()  # [..., r]
        return F.linear(hidden, self.up) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling · W2 diag(γ) W1 [d_out, d_in]."""
        return (self.up * self.gamma()) @ self.down * self.scaling

    def reserved_columns(self) -> torch.Tensor:
        """W2 diag(γ) restricted to active dimensions [d_out, r_eff], detached: the subspace this task uses."""
        gamma = self.gamma().detach()
        active = gamma != 0
        return self.up.detach()[:, active] * gamma[active]

    @torch.no_grad()
    def prune(self) -> torch.Tensor:
        """Drop inactive rows of W1, columns of W2 and entries of g (output unchanged); returns the kept mask."""
        keep = self.active_mask()
        self.down = nn.Parameter(self.down.detach()[keep].clone(), requires_grad=self.down.requires_grad)
        self.up = nn.Parameter(self.up.detach()[:, keep].clone(), requires_grad=self.up.requires_grad)
        self.gate = nn.Parameter(self.gate.detach()[keep].clone(), requires_grad=self.gate.requires_grad)
        return keep

    @torch.no_grad()
    def resize(self, rank: int) -> None:
        """Re-shape the factors to a saved (pruned) rank before loading its tensors."""
        if rank == self.rank:
            return
        self.down = nn.Parameter(self.down.new_zeros(rank, self.down.shape[1]), requires_grad=self.down.requires_grad)
        self.up = nn.Parameter(self.up.new_zeros(self.up.shape[0], rank), requires_grad=self.up.requires_grad)
        self.gate = nn.Parameter(self.gate.new_zeros(rank), requires_grad=self.gate.requires_grad)

    def parameter_count(self, include_threshold: bool = True) -> int:
        """r (d_in + d_out) + r (+ 1 for τ)."""
        return self.down.numel() + self.up.numel() + self.gate.numel() + (self.threshold.numel() if include_threshold else 0)


def orthogonality_loss(up: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """‖ W2ᵀ H ‖_F² = Σ_i Σ_j ⟨W2[:, i], H[:, j]⟩²: up [d_out, r], history [d_out, R] (detached by the caller)."""
    if history is None or history.shape[1] == 0:
        return up.new_zeros(())
    return (up.transpose(0, 1) @ history).pow(2).sum()


class GatedLayer(MultiBranchLayer):
    """A frozen nn.Linear plus named gated branches that share one input dropout and can be merged into W0."""

    branch_kind = "gated"

    def __init__(self, base_layer: nn.Module, name: str = "", dropout: float = 0.0) -> None:
        super().__init__(base_layer, name, dropout)
        if self.is_conv:
            raise LoraclError(f"module `{name}` is a Conv2d; gated adapters wrap nn.Linear only")

    def add_branch(self, branch_name: str, rank: int, **kwargs) -> GatedBranch:
        """A new branch with W2 = 0, so the layer's output is unchanged until it trains."""
        weight = self.base_layer.weight
        branch = GatedBranch(
            self.in_features, self.out_features, rank, device=weight.device, dtype=weight.dtype, **kwargs
        )
        return self.register_branch(branch_name, branch)
