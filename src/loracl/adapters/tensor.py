"""Input-conditioned tensor adapters (MetaLoRA): a CP or tensor-ring update whose seed comes per sample.

A frozen nn.Linear / nn.Conv2d gets named blocks of static factors. The active block adds

    delta_b(x) = gamma * DeltaW(s_b) x,   s_b = s0 + g_b (init zero_out)  or  s_b = g_b (init zero_seed)

where g_b is the *generated* seed of sample b, handed to the layer through `generated_seed` ([B, seed_size])
by the method before the forward. The update is never materialised per sample on the hot path:

* CP Linear:   y += gamma * U (s_b * (V^T x))                                       (spec 3.3, eq. 3)
* CP Conv2d:   1x1 conv C_in->R, depthwise k_h x 1, depthwise 1 x k_w (or one k_h x k_w with 3 modes),
               scale channel r by s_b[r], 1x1 conv R->C_out                         (spec 3.3)
* TR Linear:   Z = x G_in (R^2 channels), P = Z S_b, y += gamma * G_out P            (spec 3.4, eq. 7)
* TR Conv2d:   one conv with the contracted (G_in, G_h, G_w) kernel to R^2 channels (bond left open),
               P = Z S_b per position, 1x1 conv R^2 -> C_out with G_out.

Without a generated part (block.generated False) the update is static, i.e. a plain low-rank update that can
be merged into the base weight; with one it depends on the input and cannot.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loracl.adapters.base import AdapterLayer
from loracl.errors import LoraclError

Decomposition = Literal["cp", "tr"]
Init = Literal["zero_out", "zero_seed"]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class TensorBlock(nn.Module):
    """One task's static factors and base seed for one slot (no knowledge of where the seed comes from)."""

    def __init__(
        self,
        base_layer: nn.Module,
        decomposition: Decomposition = "cp",
        rank: int = 8,
        alpha: float | None = None,
        init: Init = "zero_out",
        tr_seed: Literal["full", "diag"] = "full",
        cp_conv_modes: Literal[3, 4] = 4,
    ) -> None:
        super().__init__()
        if decomposition not in ("cp", "tr"):
            raise LoraclError(f"tensor adapter decomposition must be 'cp' or 'tr', got {decomposition!r}")
        if rank < 1:
            raise LoraclError(f"tensor adapter rank must be >= 1, got {rank}")
        if init not in ("zero_out", "zero_seed"):
            raise LoraclError(f"tensor adapter init must be 'zero_out' or 'zero_seed', got {init!r}")
        if tr_seed not in ("full", "diag"):
            raise LoraclError(f"tensor adapter tr_seed must be 'full' or 'diag', got {tr_seed!r}")
        if cp_conv_modes not in (3, 4):
            raise LoraclError(f"tensor adapter cp_conv_modes must be 3 or 4, got {cp_conv_modes!r}")
        self.decomposition = decomposition
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank  # gamma = alpha / R, alpha = R by default
        self.init = init
        self.tr_seed = tr_seed
        self.cp_conv_modes = cp_conv_modes
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.generated = True  # False: the seed is s0 only (mapping net off or identically zero) -> mergeable
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        out_size, in_size = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:]) if self.is_conv else ()
        self.kernel_size = kernel
        r = rank
        if decomposition == "cp":
            self.factor_out = nn.Parameter(torch.empty(out_size, r, **factory))  # U / A  [d_out, R]
            self.factor_in = nn.Parameter(torch.empty(r, in_size, **factory))  # V^T / Bc^T  [R, d_in]
            if self.is_conv and cp_conv_modes == 4:
                self.factor_h = nn.Parameter(torch.empty(r, kernel[0], **factory))  # Ch^T [R, k_h]
                self.factor_w = nn.Parameter(torch.empty(r, kernel[1], **factory))  # Cw^T [R, k_w]
            elif self.is_conv:
                self.factor_k = nn.Parameter(torch.empty(r, kernel[0] * kernel[1], **factory))  # Ck^T [R, k_h k_w]
        else:
            self.core_out = nn.Parameter(torch.empty(r, out_size, r, **factory))  # G_out [a, o, c]
            self.core_in = nn.Parameter(torch.empty(r, in_size, r, **factory))  # G_in [c, i, e] (Linear) / [c, i, d]
            if self.is_conv:
                self.core_h = nn.Parameter(torch.empty(r, kernel[0], r, **factory))  # G_h [d, p, f]
                self.core_w = nn.Parameter(torch.empty(r, kernel[1], r, **factory))  # G_w [f, q, e]
        if init == "zero_out":
            base_seed = torch.ones(r, **factory) if decomposition == "cp" or tr_seed == "diag" else torch.eye(r, **factory).flatten()
            self.base_seed = nn.Parameter(base_seed)
        else:
            self.register_parameter("base_seed", None)
        self.reset_parameters()

    @property
    def seed_size(self) -> int:
        """Numbers of generated seed this slot reads: R (CP, TR diag) or R^2 (TR full)."""
        return self.rank * self.rank if self.decomposition == "tr" and self.tr_seed == "full" else self.rank

    def reset_parameters(self) -> None:
        """Spec 2.3: output-side factor zero (zero_out), the rest random with LoRA-like fan-in scaling."""
        if self.decomposition == "cp":
            for name, factor in self.named_parameters(recurse=False):
                if name == "base_seed":
                    continue
                if name in ("factor_h", "factor_w"):
                    nn.init.normal_(factor, std=1.0 / math.sqrt(factor.shape[1]))  # N(0, 1/k)
                elif name == "factor_out":
                    # [d_out, R] seen as the (R x d_out) view: kaiming on its transpose
                    nn.init.kaiming_uniform_(factor.data.T, a=math.sqrt(5))
                else:
                    nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        else:
            for name, core in self.named_parameters(recurse=False):
                if name != "base_seed":
                    nn.init.normal_(core, std=1.0 / (self.rank * math.sqrt(core.shape[1])))
        if self.init == "zero_out":
            nn.init.zeros_(self.factor_out if self.decomposition == "cp" else self.core_out)

    def parameter_count(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    # ----- seeds -----------------------------------------------------------------------------------------
    def seed(self, generated: torch.Tensor | None, batch: int, reference: torch.Tensor) -> torch.Tensor:
        """The per-sample seed s_b [B, seed_size] (TR full: the flattened R x R condition core S_b)."""
        use_generated = self.generated and generated is not None
        if use_generated and generated.shape != (batch, self.seed_size):
            raise LoraclError(f"generated seed has shape {tuple(generated.shape)}, expected {(batch, self.seed_size)}")
        if self.base_seed is None:
            if not use_generated:
                return reference.new_zeros(batch, self.seed_size)
            return generated.to(reference.dtype)
        base = self.base_seed.to(reference.dtype)
        seed = base.expand(batch, -1)
        return seed + generated.to(reference.dtype) if use_generated else seed

    def condition_core(self, seed: torch.Tensor) -> torch.Tensor:
        """TR: the seed as an R x R condition core S_b [B, R, R] (diag: embedded on the diagonal)."""
        if self.tr_seed == "diag":
            return torch.diag_embed(seed)
        return seed.view(-1, self.rank, self.rank)

    # ----- factorised forward ----------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, seed: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The additive output for x with per-sample seeds [B, seed_size], never materialising Delta W_b."""
        if self.is_conv:
            return self._delta_conv(x, seed, base_layer)
        batch, r = x.shape[0], self.rank
        if self.decomposition == "cp":
            middle = (1,) * (x.dim() - 2)  # token dims between batch and features
            hidden = F.linear(x, self.factor_in)  # [B, ..., R]
            hidden = hidden * seed.view(batch, *middle, r)
            return F.linear(hidden, self.factor_out) * self.scaling
        # G_in [c, i, e] -> [d_in, (c, e)]; Z [B, ..., (c, e)]
        in_matrix = self.core_in.permute(1, 0, 2).reshape(self.core_in.shape[1], r * r)
        z = x @ in_matrix
        # P[c, a] = sum_e Z[c, e] S_b[e, a]: one bmm per batch, [B, (..., c), e] @ [B, e, a] (not per-token 3x3 matmuls)
        p = torch.bmm(z.reshape(batch, -1, r), self.condition_core(seed)).reshape(z.shape)  # [B, ..., (c, a)]
        # G_out [a, o, c] -> [d_out, (c, a)]
        out_matrix = self.core_out.permute(1, 2, 0).reshape(self.core_out.shape[1], r * r)
        return F.linear(p, out_matrix) * self.scaling

    def _delta_conv(self, x: torch.Tensor, seed: torch.Tensor, base_layer: nn.Conv2d) -> torch.Tensor:
        batch, r = x.shape[0], self.rank
        stride, dilation = _pair(base_layer.stride), _pair(base_layer.dilation)
        padding = base_layer.padding
        if self.decomposition == "cp":
            hidden = F.conv2d(x, self.factor_in[:, :, None, None])  # [B, R, H, W]
            if self.cp_conv_modes == 4:
                pad_h, pad_w = (padding, padding) if isinstance(padding, str) else _pair(padding)
                pad_h = pad_h if isinstance(pad_h, str) else (pad_h, 0)
                pad_w = pad_w if isinstance(pad_w, str) else (0, pad_w)
                hidden = F.conv2d(hidden, self.factor_h[:, None, :, None], stride=(stride[0], 1), padding=pad_h, dilation=(dilation[0], 1), groups=r)
                hidden = F.conv2d(hidden, self.factor_w[:, None, None, :], stride=(1, stride[1]), padding=pad_w, dilation=(1, dilation[1]), groups=r)
            else:
                kernel = self.factor_k.view(r, 1, *self.kernel_size)
                hidden = F.conv2d(hidden, kernel, stride=stride, padding=padding, dilation=dilation, groups=r)
            hidden = hidden * seed.view(batch, r, 1, 1)
            return F.conv2d(hidden, self.factor_out[:, :, None, None]) * self.scaling
        # Open-bond kernel M[(c, e), i, p, q] = sum_{d, f} G_in[c,i,d] G_h[d,p,f] G_w[f,q,e]: R^2 output channels
        kernel = torch.einsum("cid,dpf,fqe->ceipq", self.core_in, self.core_h, self.core_w).reshape(r * r, -1, *self.kernel_size)
        z = F.conv2d(x, kernel, stride=stride, padding=padding, dilation=dilation)  # [B, (c, e), H', W']
        height, width = z.shape[-2:]
        z = z.view(batch, r * r, height * width).transpose(1, 2).reshape(batch, height * width * r, r)  # [B, (HW, c), e]
        p = torch.bmm(z, self.condition_core(seed))  # [B, (HW, c), a]
        p = p.view(batch, height * width, r * r).transpose(1, 2).reshape(batch, r * r, height, width)  # [B, (c, a), H', W']
        out_matrix = self.core_out.permute(1, 2, 0).reshape(self.core_out.shape[1], r * r, 1, 1)
        return F.conv2d(p, out_matrix) * self.scaling

    # ----- materialised weights (reference and merging) -------------------------------------------------
    def delta_weight(self, seed: torch.Tensor) -> torch.Tensor:
        """gamma * Delta W(s) for one seed [seed_size], shaped like the base weight (eqs. 2, 4, 5, 6)."""
        if self.decomposition == "cp":
            out = self.factor_out * seed  # U diag(s)  [d_out, R]
            if not self.is_conv:
                return (out @ self.factor_in) * self.scaling
            if self.cp_conv_modes == 4:
                weight = torch.einsum("or,ri,rp,rq->oipq", out, self.factor_in, self.factor_h, self.factor_w)
            else:
                weight = torch.einsum("or,ri,rk->oik", out, self.factor_in, self.factor_k).unflatten(-1, self.kernel_size)
            return weight * self.scaling
        condition = self.condition_core(seed.unsqueeze(0))[0]  # S [e, a]
        if not self.is_conv:
            return torch.einsum("ea,aoc,cie->oi", condition, self.core_out, self.core_in) * self.scaling
        weight = torch.einsum("ea,aoc,cid,dpf,fqe->oipq", condition, self.core_out, self.core_in, self.core_h, self.core_w)
        return weight * self.scaling

    def static_seed(self) -> torch.Tensor:
        """The seed when nothing is generated: s0 (zero_out) or zeros (zero_seed)."""
        if self.base_seed is None:
            reference = next(self.parameters())
            return reference.new_zeros(self.seed_size)
        return self.base_seed.detach()


class TensorAdapterLayer(AdapterLayer):
    """A frozen Linear/Conv2d with named tensor blocks; one block is active, its seed set per batch."""

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__(base_layer, name)
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise LoraclError(f"module `{name}`: tensor adapters support padding_mode='zeros' only, got {base_layer.padding_mode!r}")
        self.blocks = nn.ModuleDict()
        self.active_block: str | None = None
        self.generated_seed: torch.Tensor | None = None  # [B, seed_size], set by the method for one forward
        self._merged_block: str | None = None

    def add_block(self, block_name: str, **kwargs) -> TensorBlock:
        """A new block of factors for this slot; its update is zero at creation (spec 2.3)."""
        if block_name in self.blocks:
            raise LoraclError(f"module `{self.module_name}` already has a tensor block named {block_name!r}")
        block = TensorBlock(self.base_layer, **kwargs)
        self.blocks[block_name] = block
        return block

    def served_delta(self) -> torch.Tensor | None:
        """The active block's fixed update, or None when its seed is generated from each input."""
        if self.active_block is None:
            return torch.zeros_like(self.base_layer.weight)
        block = self.blocks[self.active_block]
        if block.generated:
            return None
        with torch.no_grad():
            return block.delta_weight(block.static_seed()).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.bypassed(x)
        result = self.base_layer(x)
        if self.active_block is None or self.active_block == self._merged_block:
            return result
        block = self.blocks[self.active_block]
        inputs = x.to(next(block.parameters()).dtype)
        seed = block.seed(self.generated_seed, x.shape[0], inputs)
        return result + block.delta(inputs, seed, self.base_layer).to(result.dtype)

    def materialised_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: F.linear / F.conv2d of each sample with W0 + Delta W_b built explicitly (slow; tests)."""
        block = self.blocks[self.active_block]
        seeds = block.seed(self.generated_seed, x.shape[0], x)
        outputs = []
        for sample, seed in zip(x, seeds):
            weight = self.base_layer.weight + block.delta_weight(seed)
            sample = sample.unsqueeze(0)
            if block.is_conv:
                conv = self.base_layer
                outputs.append(F.conv2d(sample, weight, conv.bias, conv.stride, conv.padding, conv.dilation))
            else:
                outputs.append(F.linear(sample, weight, self.base_layer.bias))
        return torch.cat(outputs)

    def grouped_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spec 3.4 form (a): per-sample kernels W0 + Delta W_b as one grouped conv (batch folded into channels)."""
        block = self.blocks[self.active_block]
        conv = self.base_layer
        seeds = block.seed(self.generated_seed, x.shape[0], x)
        kernels = torch.stack([conv.weight + block.delta_weight(seed) for seed in seeds])  # [B, C_out, C_in, kh, kw]
        batch = x.shape[0]
        out = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]), kernels.flatten(0, 1), None, conv.stride, conv.padding, conv.dilation, groups=batch
        )
        out = out.view(batch, conv.out_channels, *out.shape[2:])
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active block's static update into W0; refused while its seed is generated per input."""
        if self.merged:
            return
        if self.active_block is None:
            raise LoraclError(f"module `{self.module_name}`: no active tensor block to merge")
        if self.blocks[self.active_block].generated:
            raise LoraclError(
                f"module `{self.module_name}`: block {self.active_block!r} generates its seed from the input, "
                "so its update cannot be merged (only a block with generated=False, i.e. a zero mapping net, can)"
            )
        super().merge()
        self._merged_block = self.active_block

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self._merged_block = None


__all__ = ["TensorAdapterLayer", "TensorBlock"]
