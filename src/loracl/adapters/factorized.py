"""F-LoRA: a shared low-rank subspace (A, B) per layer, small per-task r x r cores inside it.

For a frozen W0 (d_out x d_in) the layer keeps
    A  (r x d_in)   shared down-projection        B  (d_out x r)  shared up-projection
    K  (r x r)      accumulated core of finished tasks (a buffer)
    M, N (r x r)    the live task's cores (trainable while a task trains)
and computes, for a token u and a rank mask m in {0,1}^r (a prefix of ones),
    z  = A u;   z' = K z + N (m * (M z));   y = W0 u + b0 + s B z'        (s = alpha / r)
so a task's increment  s B N diag(m) M A  has rank <= sum(m), and folding it into K is exact.
With `single_core` (the spec's `core_form: single` ablation) a task trains N alone and M is the identity
(never stored): the increment is  s B N diag(m) A,  r^2 new values per task instead of 2 r^2.
For Conv2d, A is a conv with the base kernel's geometry and B a 1x1 conv, as in PEFT's LoRA Conv2d;
the cores mix the r channels of the down-projected map.
The layer knows nothing about tasks beyond "a live pair of cores, then fold it"; the method decides when.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loracl.adapters.base import AdapterLayer
from loracl.errors import LoraclError

SharedBasisInit = Literal["svd", "svd_minor", "random_orthogonal", "lora"]


def _flat_weight(weight: torch.Tensor) -> torch.Tensor:
    """The base weight as a matrix: [d_out, d_in] or, for a conv, [c_out, c_in * k_h * k_w]."""
    return weight.reshape(weight.shape[0], -1)


class FactorizedLoraLayer(AdapterLayer):
    """A frozen Linear/Conv2d whose delta lives in one shared rank-r subspace, with per-task r x r cores."""

    def __init__(
        self,
        base_layer: nn.Module,
        name: str = "",
        rank: int = 8,
        alpha: float | None = None,
        shared_basis: SharedBasisInit = "svd",
        generator: torch.Generator | None = None,
        single_core: bool = False,
    ) -> None:
        super().__init__(base_layer, name)
        weight = _flat_weight(base_layer.weight.detach())
        d_out, d_in = weight.shape
        if rank < 1 or rank > min(d_out, d_in):
            raise LoraclError(f"module `{name}`: F-LoRA rank {rank} must be in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}]")
        self.rank = rank
        self.single_core = single_core
        self.scaling = (alpha if alpha is not None else rank) / rank
        down, up = self._initial_bases(weight, rank, shared_basis, generator)
        self.shared_A = nn.Parameter(down.to(weight.device), requires_grad=False)  # [r, d_in]
        self.shared_B = nn.Parameter(up.to(weight.device), requires_grad=False)  # [d_out, r]
        self.register_buffer("accumulated_core", torch.zeros(rank, rank, dtype=weight.dtype, device=weight.device))
        self.register_parameter("core_M", None)  # live task cores [r, r], present only while a task trains (no M when single_core)
        self.register_parameter("core_N", None)
        self.kept_cores = nn.Module()  # buffers M_<task>, N_<task>: trimmed cores of finished tasks
        self.rank_mask: torch.Tensor | None = None  # [r] forward mask for the live cores; None = all ones
        if self.is_conv:
            self.stride, self.padding, self.dilation = base_layer.stride, base_layer.padding, base_layer.dilation

    @staticmethod
    def _initial_bases(
        weight: torch.Tensor, rank: int, mode: str, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d_in], B [d_out, r]): orthonormal from W0's SVD or a seeded QR, or PEFT's LoRA init."""
        d_out, d_in = weight.shape
        if mode in ("svd", "svd_minor"):
            # float64 SVD so the singular subspaces are stable to the tests' tolerance
            left, _, right_t = torch.linalg.svd(weight.double(), full_matrices=False)
            columns = slice(0, rank) if mode == "svd" else slice(left.shape[1] - rank, left.shape[1])
            return right_t[columns].to(weight.dtype).contiguous(), left[:, columns].to(weight.dtype).contiguous()
        if mode == "random_orthogonal":
            down, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=generator, dtype=torch.float64))
            up, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=generator, dtype=torch.float64))
            return down.T.to(weight.dtype).contiguous(), up.to(weight.dtype).contiguous()
        if mode == "lora":
            down = torch.empty(rank, d_in, dtype=weight.dtype)  # PEFT's LoRA init: A Kaiming-uniform, B = 0
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            return down, torch.zeros(d_out, rank, dtype=weight.dtype)
        raise LoraclError(f"unknown shared_basis init {mode!r}: use svd, svd_minor, random_orthogonal or lora")

    # ----- task cores --------------------------------------------------------------------------------
    def start_task_cores(self, identity_both: bool = False) -> None:
        """New live cores: M = I, N = 0 (the increment starts at exactly zero), or M = N = I (learn-bases task)."""
        if self.merged:
            raise LoraclError(f"module `{self.module_name}`: unmerge before starting task cores")
        eye = torch.eye(self.rank, dtype=self.shared_A.dtype, device=self.shared_A.device)
        self.core_M = None if self.single_core else nn.Parameter(eye.clone())
        self.core_N = nn.Parameter(eye.clone() if identity_both else torch.zeros_like(eye))

    @property
    def task_live(self) -> bool:
        """Whether a task's cores are live (started and not yet folded)."""
        return self.core_N is not None

    def live_cores(self) -> list[nn.Parameter]:
        """The live task's core parameters: [M, N], or [N] when single_core."""
        return [core for core in (self.core_M, self.core_N) if core is not None]

    def live_core(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """N diag(m) M of the live task [r, r] (zero when no task is live; M = I when single_core)."""
        if not self.task_live:
            return torch.zeros_like(self.accumulated_core)
        masked = self.core_N * self._mask(mask)
        return masked if self.core_M is None else masked @ self.core_M

    def _mask(self, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            mask = self.rank_mask
        if mask is None:
            return torch.ones(self.rank, dtype=self.shared_A.dtype, device=self.shared_A.device)
        return mask.to(self.shared_A.dtype)

    @torch.no_grad()
    def fold_task_cores(self, task_key: str, task_rank: int, keep: bool = True) -> None:
        """K += N diag(c_{r_t}) M; keep the trimmed pair (N[:, :r_t], M[:r_t, :]) as buffers if asked; drop the live pair."""
        if not self.task_live:
            raise LoraclError(f"module `{self.module_name}`: no live task cores to fold")
        mask = (torch.arange(self.rank, device=self.shared_A.device) < task_rank).to(self.shared_A.dtype)
        self.accumulated_core.add_(self.live_core(mask))
        if keep:
            if self.core_M is not None:
                self.kept_cores.register_buffer(f"M_{task_key}", self.core_M[:task_rank].detach().clone())
            self.kept_cores.register_buffer(f"N_{task_key}", self.core_N[:, :task_rank].detach().clone())
        self.core_M = None
        self.core_N = None
        self.rank_mask = None

    def add_kept_core_placeholders(self, task_key: str) -> None:
        """Empty buffers for a finished task's trimmed cores, filled (and resized) by a state load."""
        empty = torch.zeros(0, dtype=self.shared_A.dtype, device=self.shared_A.device)
        if not self.single_core:
            self.kept_cores.register_buffer(f"M_{task_key}", empty.clone())
        self.kept_cores.register_buffer(f"N_{task_key}", empty.clone())

    def kept_task_core(self, task_key: str) -> torch.Tensor:
        """A finished task's N_t diag(m_t) M_t [r, r], rebuilt from its trimmed cores."""
        trimmed_N = getattr(self.kept_cores, f"N_{task_key}")  # [r, r_t]
        if self.single_core:  # M = I: N's r_t kept columns, zero-padded to r
            return F.pad(trimmed_N, (0, self.rank - trimmed_N.shape[1]))
        return trimmed_N @ getattr(self.kept_cores, f"M_{task_key}")

    def task_increment(self, core: torch.Tensor) -> torch.Tensor:
        """s B core A shaped like the base weight ([d_out, d_in] or [c_out, c_in, k_h, k_w])."""
        delta = self.scaling * (self.shared_B @ core @ self.shared_A)
        return delta.reshape(self.base_layer.weight.shape)

    def delta_weight(self) -> torch.Tensor:
        """The layer's whole current delta: folded tasks plus the live task under the current mask."""
        return self.task_increment(self.accumulated_core + self.live_core())

    # ----- forward -----------------------------------------------------------------------------------
    def _down(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            kernel = self.shared_A.reshape(self.rank, *self.base_layer.weight.shape[1:])
            return F.conv2d(x, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)  # [N, r, H', W']
        return F.linear(x, self.shared_A)  # [..., r]

    def _mix(self, z: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """Apply an r x r core to the rank axis (last for Linear, channels for Conv2d)."""
        if self.is_conv:
            return torch.einsum("nrhw,sr->nshw", z, core)
        return F.linear(z, core)

    def _up(self, z: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(z, self.shared_B[:, :, None, None])
        return F.linear(z, self.shared_B)

    def served_delta(self) -> torch.Tensor | None:
        with torch.no_grad():
            return self.delta_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.bypassed(x)
        result = self.base_layer(x)
        if self.merged:
            return result
        z = self._down(x.to(self.shared_A.dtype))
        mixed = self._mix(z, self.accumulated_core)
        if self.task_live:
            mask = self._mask(None)
            mask = mask.view(1, -1, 1, 1) if self.is_conv else mask
            coded = z if self.core_M is None else self._mix(z, self.core_M)
            mixed = mixed + self._mix(coded * mask, self.core_N)
        return result + (self.scaling * self._up(mixed)).to(result.dtype)

    def task_parameter_count(self) -> int:
        """New trainable values a task adds to this layer: 2 r^2 (r^2 when single_core)."""
        return (1 if self.single_core else 2) * self.rank * self.rank
