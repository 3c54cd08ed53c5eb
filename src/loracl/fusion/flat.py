"""A LoRA as one flat, per-tensor normalised, zero-padded vector and back (ICM-LoRA's weight encoding, spec 2.2).

Tensor order is fixed: modules sorted by name, for each module lora_A then lora_B. Each tensor is z-scored with
its own (mean, std); the statistics either come from the sample itself (`per_sample`, ICM-LoRA's round trip) or
are shared across a pooled weight dataset (`shared`, spec G5: the only well-defined choice for a fused vector).

The delta target (spec G6) encodes each module's whole update dW = s B A instead of its factors: an adapter is
first turned into its full-rank view (A = I, B = dW, s = 1, `full_rank_view`), whose layout flattens B only,
and a decoded view is cut back to a rank-r LoRA by truncated SVD (`truncated_lora`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loracl.adapters.peft_io import LoraPair
from loracl.errors import LoraclError

PAD_MULTIPLE = 4096  # ICM-LoRA's divide_slice_length; also 2**12 for the 12 stride-2 conv layers


def padded_length(numel: int, multiple: int = PAD_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that holds `numel` values."""
    return max(1, -(-numel // multiple)) * multiple


@dataclass
class FlatLayout:
    """Where each LoRA tensor sits in the flat vector, with its shape and the scaling of its module."""

    keys: list[tuple[str, str]]  # (module, "A" | "B") in vector order
    shapes: list[tuple[int, ...]]
    scalings: dict[str, float]
    identity_down: bool = False  # full-rank views: only B (= dW) is stored, A is the identity

    @classmethod
    def of(cls, adapter: dict[str, LoraPair], identity_down: bool = False) -> FlatLayout:
        keys, shapes = [], []
        for module in sorted(adapter):
            pair = adapter[module]
            if not identity_down:
                keys.append((module, "A"))
                shapes.append(tuple(pair.lora_A.shape))
            keys.append((module, "B"))
            shapes.append(tuple(pair.lora_B.shape))
        return cls(keys, shapes, {module: adapter[module].scaling for module in adapter}, identity_down)

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(shape).numel()) for shape in self.shapes)

    @property
    def padded(self) -> int:
        return padded_length(self.numel)

    def tensors(self, adapter: dict[str, LoraPair]) -> list[torch.Tensor]:
        """The adapter's tensors in layout order (shape checked)."""
        out = []
        for (module, part), shape in zip(self.keys, self.shapes):
            if module not in adapter:
                raise LoraclError(f"adapter lacks module `{module}`")
            tensor = adapter[module].lora_A if part == "A" else adapter[module].lora_B
            if tuple(tensor.shape) != shape:
                raise LoraclError(f"module `{module}` lora_{part} has shape {tuple(tensor.shape)}, expected {shape}")
            out.append(tensor.detach().float())
        return out


@dataclass
class TensorStats:
    """Per-tensor (mean, std) in layout order: 2 floats per LoRA tensor; optionally a per-position offset
    subtracted after z-scoring (the pooled weight dataset's mean vector, `centre`)."""

    mean: torch.Tensor  # [num_tensors]
    std: torch.Tensor  # [num_tensors]
    offset: torch.Tensor | None = None  # [N_pad], zero on the padding


def tensor_stats(layout: FlatLayout, adapters: list[dict[str, LoraPair]], eps: float = 1e-8) -> TensorStats:
    """Shared statistics: mean and std of each tensor position pooled over all given adapters."""
    means, stds = [], []
    per_adapter = [layout.tensors(adapter) for adapter in adapters]
    for position in range(len(layout.keys)):
        pooled = torch.cat([tensors[position].reshape(-1) for tensors in per_adapter])
        means.append(pooled.mean())
        stds.append(pooled.std(unbiased=False).clamp_min(eps))
    return TensorStats(torch.stack(means), torch.stack(stds))


def flatten(layout: FlatLayout, adapter: dict[str, LoraPair], stats: TensorStats | None = None) -> tuple[torch.Tensor, TensorStats]:
    """Eq. (2): z-score each tensor (own stats when `stats` is None), concatenate, zero-pad -> [N_pad]."""
    tensors = layout.tensors(adapter)
    if stats is None:
        stats = tensor_stats(layout, [adapter])
    pieces = [((tensor - stats.mean[i]) / stats.std[i]).reshape(-1) for i, tensor in enumerate(tensors)]
    flat = torch.nn.functional.pad(torch.cat(pieces), (0, layout.padded - layout.numel))
    return (flat if stats.offset is None else flat - stats.offset), stats


def unflatten(layout: FlatLayout, flat: torch.Tensor, stats: TensorStats) -> dict[str, LoraPair]:
    """Inverse of flatten: cut the padding, split, de-normalise (sigma * piece + mu), reshape."""
    if flat.numel() != layout.padded:
        raise LoraclError(f"flat LoRA vector has {flat.numel()} values, the layout needs {layout.padded}")
    if stats.offset is not None:
        flat = flat + stats.offset
    parts: dict[str, dict[str, torch.Tensor]] = {}
    offset = 0
    for i, ((module, part), shape) in enumerate(zip(layout.keys, layout.shapes)):
        size = int(torch.Size(shape).numel())
        piece = flat[offset : offset + size] * stats.std[i] + stats.mean[i]
        parts.setdefault(module, {})[part] = piece.reshape(shape)
        offset += size
    if layout.identity_down:  # a full-rank view: A = I
        identities: dict[tuple, torch.Tensor] = {}
        for p in parts.values():
            p["A"] = shared_identity(identities, p["B"])
    return {module: LoraPair(p["A"], p["B"], layout.scalings[module]) for module, p in parts.items()}


def full_rank_view(adapter: dict[str, LoraPair], identities: dict[tuple, torch.Tensor] | None = None) -> dict[str, LoraPair]:
    """Each module's update dW = s B A as a LoRA pair (A = I [d_in, d_in], B = dW [d_out, d_in], s = 1); views built
    with the same `identities` share their I's."""
    identities = {} if identities is None else identities
    view = {}
    for module, pair in adapter.items():
        if pair.lora_A.dim() != 2:
            raise LoraclError(f"module `{module}`: the delta target handles Linear LoRAs only (lora_A has shape {tuple(pair.lora_A.shape)})")
        delta = pair.scaling * (pair.lora_B.float() @ pair.lora_A.float())  # [d_out, d_in]
        view[module] = LoraPair(shared_identity(identities, delta), delta, 1.0)
    return view


def shared_identity(cache: dict[tuple, torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """I [d_in, d_in] for a dW [d_out, d_in]: one per width, device and dtype in `cache` (views never write A)."""
    key = (delta.shape[1], delta.device, delta.dtype)
    if key not in cache:
        cache[key] = torch.eye(delta.shape[1], dtype=delta.dtype, device=delta.device)
    return cache[key]


def truncated_lora(deltas: dict[str, torch.Tensor], ranks: dict[str, int], scalings: dict[str, float]) -> dict[str, LoraPair]:
    """The best rank-r LoRA of each module's dW [d_out, d_in] (Eckart-Young), split evenly: B = U sqrt(S/s), A = sqrt(S/s) V^T."""
    adapter = {}
    for module, delta in deltas.items():
        rank, scaling = ranks[module], scalings[module]
        if scaling == 0:
            raise LoraclError(f"module `{module}`: a LoRA scaling of 0 cannot carry a rank-{rank} update")
        if rank > min(delta.shape):
            raise LoraclError(f"module `{module}`: delta_rank {rank} exceeds min(d_out, d_in) = {min(delta.shape)}")
        left, singular, right_t = torch.linalg.svd(delta.double(), full_matrices=False)  # float64: stable factors
        root = (singular[:rank] / abs(scaling)).sqrt()
        down = (root[:, None] * right_t[:rank]).to(delta.dtype)  # [r, d_in]
        up = (left[:, :rank] * root[None] * (1.0 if scaling > 0 else -1.0)).to(delta.dtype)  # [d_out, r]
        adapter[module] = LoraPair(down.contiguous(), up.contiguous(), scaling)
    return adapter


def flat_gradient(layout: FlatLayout, grads: dict[str, LoraPair], stats: TensorStats) -> torch.Tensor:
    """Chain rule through de-normalisation: d loss / d flat = sigma_t * d loss / d tensor, zero on the padding."""
    pieces = [tensor.reshape(-1) * stats.std[i] for i, tensor in enumerate(layout.tensors(grads))]
    flat = torch.cat(pieces)
    return torch.nn.functional.pad(flat, (0, layout.padded - flat.numel()))
