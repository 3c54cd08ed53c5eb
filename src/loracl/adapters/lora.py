"""Plain LoRA, numerically identical to PEFT's, with several named branches per layer.

One wrapper holds any number of (A, B) pairs ("branches"): seq_lora uses one, inc_lora and the peer
baselines add one per task and freeze the older ones. Each branch computes
    delta(x) = scaling * B(A(dropout(x)))          scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)
exactly as `peft.tuners.lora.Linear` / `Conv2d` do, so equal A, B, alpha and r give PEFT's outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loracl.adapters.base import MultiBranchLayer
from loracl.errors import LoraclError


class LoraBranch(nn.Module):
    """One LoRA pair for a Linear ([r, d_in] and [d_out, r]) or a Conv2d (A: conv k x k, B: conv 1 x 1)."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if rank < 1:
            raise LoraclError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        if self.is_conv:
            out_channels, in_channels, kernel_h, kernel_w = weight.shape
            self.stride, self.padding, self.dilation = base_layer.stride, base_layer.padding, base_layer.dilation
            self.lora_A = nn.Parameter(torch.empty(rank, in_channels, kernel_h, kernel_w, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_channels, rank, 1, 1, **factory))
        else:
            out_features, in_features = weight.shape
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        """PEFT's default: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero, so the delta starts at 0."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        elif init != "none":
            raise LoraclError(f"unknown LoRA init {init!r}: use kaiming, gaussian or none")
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's additive output, same shape as the base layer's output."""
        x = self.dropout(x)
        if self.is_conv:
            hidden = F.conv2d(x, self.lora_A, stride=self.stride, padding=self.padding, dilation=self.dilation)
            return F.conv2d(hidden, self.lora_B) * self.scaling
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, shaped like the base weight ([d_out, d_in] or [c_out, c_in, k_h, k_w])."""
        if not self.is_conv:
            return (self.lora_B @ self.lora_A) * self.scaling
        if self.lora_A.shape[2:] == (1, 1):
            product = self.lora_B.flatten(1) @ self.lora_A.flatten(1)  # [c_out, c_in]
            return product[:, :, None, None] * self.scaling
        # A: [r, c_in, kh, kw] -> [c_in, r, kh, kw]; conv with B [c_out, r, 1, 1] -> [c_in, c_out, kh, kw]
        return F.conv2d(self.lora_A.transpose(0, 1), self.lora_B).transpose(0, 1) * self.scaling

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def parameter_count(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()


class LoraLayer(MultiBranchLayer):
    """A frozen Linear/Conv2d plus named LoRA branches, each mergeable into the base weight.

    `dropout` is one mask shared by all branches (O-LoRA's code); a branch's own `dropout` (PEFT's per-adapter
    dropout) is drawn separately. With one branch the two are the same thing.
    """

    branch_kind = "LoRA"

    def add_branch(self, branch_name: str, rank: int, alpha: float, **kwargs) -> LoraBranch:
        """Create a new (A, B) pair; its delta is zero until B trains."""
        return self.register_branch(branch_name, LoraBranch(self.base_layer, rank, alpha, **kwargs))
