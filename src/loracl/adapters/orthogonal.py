"""LoRA composition with per-task coefficients (LoRAC): one (A, B) pair per task, combined by scalars ω.

In the paper's orientation (y = x W, W of shape [d_in, d_out]) a slot's weight is
    W = W0 + γ · Σ_i ω_i A_i B_i          A_i: [d_in, r], B_i: [r, d_out], γ = alpha / r.
The torch weight is Wᵀ, so the delta added to `base_layer.weight` is γ (Σ_i ω_i A_i B_i)ᵀ (reshaped for Conv2d,
whose d_in is c_in·k_h·k_w). The layer keeps no task knowledge beyond pool positions: the method decides which
position trains, snapshots ω after each task into `omega_bank`, and may freeze the whole slot from a position on
(`frozen_from`), after which later pairs are ignored and the slot's weight never changes again.

Like the official code, the effective weight is materialised on every forward, so the loss gradient with
respect to the whole matrix (needed by the IPC importance score) is available through a tensor hook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loracl.adapters.base import AdapterLayer
from loracl.errors import LoraclError

TRAINING = None  # model_index value meaning "live coefficients of the task being trained"


class ComposedLoraLayer(AdapterLayer):
    """A frozen Linear/Conv2d plus a growing pool of LoRA pairs composed with per-task coefficients."""

    def __init__(self, base_layer: nn.Module, name: str = "", rank: int = 16, alpha: float = 1.0) -> None:
        super().__init__(base_layer, name)
        if rank < 1:
            raise LoraclError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = alpha / rank
        self.factors_A = nn.ParameterList()  # position i: [d_in, r]
        self.factors_B = nn.ParameterList()  # position i: [r, d_out]
        self.omega = nn.ParameterList()  # position i: scalar coefficient ω_i
        weight = base_layer.weight
        # row j: ω as it was at the end of position j (entries > j are 0)
        self.register_buffer("omega_bank", torch.zeros(0, 0, device=weight.device, dtype=weight.dtype))
        # first pool position whose pair is ignored because the slot is frozen; -1 while the slot is free
        self.register_buffer("frozen_from", torch.tensor(-1, device=weight.device))
        self.model_index: int | None = TRAINING  # None: training composition; k: inference model k
        self.track_weight_gradient = False
        self.weight_gradient: torch.Tensor | None = None  # ∂L/∂W of the effective weight, summed over backwards
        self.weight_value: torch.Tensor | None = None  # the effective weight that gradient belongs to
        self._inference_deltas: dict[int, torch.Tensor] = {}

    # ----- structure --------------------------------------------------------------------------------
    @property
    def fan_in(self) -> int:
        return self.base_layer.weight[0].numel()  # d_in: in_features, or c_in·k_h·k_w for Conv2d

    @property
    def pool_size(self) -> int:
        return len(self.factors_A)

    @property
    def is_frozen(self) -> bool:
        return int(self.frozen_from) >= 0

    def used_positions(self, upto: int) -> list[int]:
        """Positions < upto whose pair contributes (all of them, or those before the freeze)."""
        stop = upto if not self.is_frozen else min(upto, int(self.frozen_from))
        return list(range(stop))

    def add_pair(self) -> int:
        """A new (A, B, ω) at the next position: A Kaiming-uniform on [d_in, r] (fan-in r, as the official
        code), B zero, ω one; the caller seeds the RNG. Returns the position."""
        if self.merged:
            raise LoraclError(f"module `{self.module_name}`: unmerge before adding pairs")
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        A = torch.empty(self.fan_in, self.rank, **factory)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # torch takes fan-in = size(1) = r: U(±1/√r)
        self.factors_A.append(nn.Parameter(A))
        self.factors_B.append(nn.Parameter(torch.zeros(self.rank, weight.shape[0], **factory)))
        self.omega.append(nn.Parameter(torch.ones((), **factory)))
        self._inference_deltas.clear()
        return self.pool_size - 1

    @torch.no_grad()
    def snapshot_omega(self, position: int) -> None:
        """Ω[position] ← the current ω (positions 0..position); grows the bank to hold the row."""
        size = max(self.pool_size, position + 1)
        bank = torch.zeros(size, size, device=self.omega_bank.device, dtype=self.omega_bank.dtype)
        old = self.omega_bank.shape[0]
        bank[:old, :old] = self.omega_bank
        bank[position, : position + 1] = torch.stack([self.omega[i].detach() for i in range(position + 1)])
        self.omega_bank = bank
        self._inference_deltas.clear()

    def freeze_from(self, position: int) -> None:
        """Freeze the slot: pairs at positions >= position never contribute; nothing here trains again."""
        if not self.is_frozen:
            self.frozen_from.fill_(position)
        self._inference_deltas.clear()

    # ----- the composed delta -----------------------------------------------------------------------
    def _compose(self, positions: list[int], coefficients: list[torch.Tensor]) -> torch.Tensor | None:
        """γ (Σ ω_i A_i B_i)ᵀ shaped like the base weight, or None when nothing contributes."""
        if not positions:
            return None
        A = torch.cat([self.factors_A[i] * c for i, c in zip(positions, coefficients)], dim=1)  # [d_in, n·r]
        B = torch.cat([self.factors_B[i] for i in positions], dim=0)  # [n·r, d_out]
        return (A @ B).T.reshape(self.base_layer.weight.shape) * self.scaling

    def training_delta(self) -> torch.Tensor | None:
        """Eq. (1)/(2): live ω for earlier pairs; the newest pair enters with its ω, which stays 1 while it trains."""
        positions = self.used_positions(self.pool_size)
        return self._compose(positions, [self.omega[i] for i in positions])

    def inference_delta(self, model_index: int) -> torch.Tensor | None:
        """Eq. (3): model k composes positions < k with the snapshot Ω[k-1]; model 0 is the bare layer."""
        if model_index == 0:
            return None
        if model_index > self.omega_bank.shape[0]:
            raise LoraclError(f"module `{self.module_name}`: no ω snapshot for model {model_index}")
        if model_index not in self._inference_deltas:
            positions = self.used_positions(model_index)
            row = self.omega_bank[model_index - 1]
            with torch.no_grad():
                delta = self._compose(positions, [row[i] for i in positions])
            self._inference_deltas[model_index] = delta if delta is not None else torch.zeros_like(self.base_layer.weight)
        return self._inference_deltas[model_index]

    def clear_cache(self) -> None:
        self._inference_deltas.clear()

    # ----- forward ----------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module signature
        self._inference_deltas.clear()  # cached deltas would stay on the old device or dtype
        return super()._apply(fn, recurse)

    def _accumulate_gradient(self, gradient: torch.Tensor) -> None:
        self.weight_gradient = gradient.detach() if self.weight_gradient is None else self.weight_gradient + gradient.detach()

    def served_delta(self) -> torch.Tensor | None:
        with torch.no_grad():
            if self.model_index is TRAINING:
                delta = self.training_delta()
            else:
                delta = self.inference_delta(self.model_index)
        return torch.zeros_like(self.base_layer.weight) if delta is None else delta.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.bypassed(x)
        if self.merged:
            return self.base_layer(x)
        delta = self.training_delta() if self.model_index is TRAINING else self.inference_delta(self.model_index)
        if delta is None:
            return self.base_layer(x)
        weight = self.base_layer.weight + delta.to(self.base_layer.weight.dtype)
        if self.track_weight_gradient and weight.requires_grad:
            self.weight_value = weight.detach()
            weight.register_hook(self._accumulate_gradient)
        if self.is_conv:
            conv = self.base_layer
            return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.linear(x, weight, self.base_layer.bias)

    # ----- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, model_index: int | None = None) -> None:
        """Write model k's weight (default: the newest snapshot) into the base layer; unmerge restores W0 exactly."""
        if self.merged:
            raise LoraclError(f"module `{self.module_name}` is already merged")
        serving = self.model_index
        self.model_index = self.omega_bank.shape[0] if model_index is None else model_index
        try:
            super().merge()
        finally:
            self.model_index = serving

    def pair_parameter_count(self) -> int:
        """r·(d_in + d_out): the size of one task's pair at this slot."""
        return self.rank * (self.fan_in + self.base_layer.weight.shape[0])
