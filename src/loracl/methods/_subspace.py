"""Input subspaces for the peer baselines: layer-input covariances, InfLoRA's designed down-projection, (Dual)GPM.

Shared by inflora (and usable by any method that needs the input subspace of earlier tasks). Everything is
computed in float32 (baselines.md 3.3: "all decompositions in float32"). torch.linalg is used for every
decomposition; the DualGPM bookkeeping has no library equivalent, so it is written here following the
InfLoRA code's update rule (baselines.md 3.3), in our own words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from loracl.errors import LoraclError

Flag = Literal["remove", "retain"]
Energy = Literal["code", "gpm"]


def _token_rows(inputs: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Layer inputs as rows [N, d]: all tokens, or only non-padding ones when a [B, L] mask fits."""
    if token_mask is not None and inputs.dim() == 3 and tuple(token_mask.shape) == tuple(inputs.shape[:2]):
        return inputs[token_mask.bool()]
    return inputs.reshape(-1, inputs.shape[-1])


@torch.no_grad()
def collect_input_covariances(
    layers: dict[str, nn.Module],
    batches: Iterable[dict[str, Any]],
    run_forward: Callable[[dict[str, Any]], Any],
) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Uncentred input covariance C = (1/N) sum x x^T [d, d] of every layer, over all (non-padding) tokens.

    Forward pre-hooks on the layer wrappers see their inputs; layers fed the very same tensor (key and value of
    one attention block) form a group, computed once. Returns covariances per layer and the groups (model order).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in layers}
    groups: list[list[str]] | None = None
    seen: list[tuple[str, torch.Tensor]] = []
    token_mask: list[torch.Tensor | None] = [None]

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append((name, args[0]))

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            seen.clear()
            token_mask[0] = batch["inputs"].get("attention_mask")
            run_forward(batch)
            per_tensor: dict[int, tuple[torch.Tensor, int]] = {}
            batch_groups: dict[int, list[str]] = {}
            for name, inputs in seen:
                key = id(inputs)
                if key not in per_tensor:
                    rows = _token_rows(inputs, token_mask[0]).float()
                    per_tensor[key] = (rows.T @ rows, rows.shape[0])  # [d, d]
                batch_groups.setdefault(key, []).append(name)
                outer, count = per_tensor[key]
                sums[name] = outer.clone() if name not in sums else sums[name] + outer
                counts[name] += count
            if groups is None:
                groups = list(batch_groups.values())
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if counts[name] == 0]
    if missing:
        raise LoraclError(f"no inputs reached adapted layer `{missing[0]}` during the covariance pass")
    return {name: sums[name] / counts[name] for name in layers}, groups or []


def design_down_projection(
    covariance: torch.Tensor,
    free_projector: torch.Tensor | None,
    rank: int,
    design: Literal["cov_proj", "sym"] = "cov_proj",
    row_scale: float = 1.0 / math.sqrt(3.0),
) -> tuple[torch.Tensor, float]:
    """InfLoRA's A_t [r, d]: top-r left singular vectors of P C (P projects onto the free subspace), rows scaled.

    design="cov_proj" (the code): SVD of the non-symmetric P C. design="sym": eigenvectors of P C P.
    Returns A and the r-th singular value (a diagnostic: near zero means the free subspace ran out of signal).
    """
    covariance = covariance.float()
    dim = covariance.shape[0]
    if rank > dim:
        raise LoraclError(f"inflora: rank {rank} exceeds the layer's input size {dim}")
    if free_projector is None:
        projected = covariance
    elif design == "cov_proj":
        projected = free_projector @ covariance
    else:
        projected = free_projector @ covariance @ free_projector
    if design == "sym" and free_projector is not None:
        values, vectors = torch.linalg.eigh(projected)
        order = torch.argsort(values, descending=True)
        top, spectrum = vectors[:, order[:rank]], values[order]
    else:
        left, spectrum, _ = torch.linalg.svd(projected, full_matrices=False)
        top = left[:, :rank]
    return (top.T * row_scale).contiguous(), float(spectrum[rank - 1])


def _energy(singular_values: torch.Tensor, energy: Energy) -> torch.Tensor:
    """The code thresholds squared singular values of C (squared eigenvalues); GPM uses the eigenvalues."""
    return singular_values**2 if energy == "code" else singular_values


@dataclass
class SubspaceBasis:
    """One layer group's memory: an orthonormal basis [d, k] of the old-task input subspace (flag remove)
    or of its orthogonal complement (flag retain), whichever is smaller (DualGPM)."""

    basis: torch.Tensor
    flag: Flag = "remove"

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def free_projector(self) -> torch.Tensor:
        """Projector onto the subspace new tasks may use: I - M M^T (remove) or M_perp M_perp^T (retain)."""
        if self.flag == "remove":
            return torch.eye(self.dim, dtype=self.basis.dtype, device=self.basis.device) - self.basis @ self.basis.T
        return self.basis @ self.basis.T

    def old_projector(self) -> torch.Tensor:
        """Projector onto the old-task input subspace."""
        return torch.eye(self.dim, dtype=self.basis.dtype, device=self.basis.device) - self.free_projector()


def first_basis(covariance: torch.Tensor, threshold: float, energy: Energy, dual: bool) -> SubspaceBasis:
    """First task: keep the top-k directions whose energy share (cumulative) stays below the threshold."""
    covariance = covariance.float()
    dim = covariance.shape[0]
    left, singular, _ = torch.linalg.svd(covariance)
    share = _energy(singular, energy) / _energy(singular, energy).sum()
    kept = int((torch.cumsum(share, 0) < threshold).sum())
    kept = max(kept, 1)
    if dual and kept >= dim / 2:
        # The code stores U[:, :k] but flags it retain; we store the complement, as the flag means (spec 3.8.4).
        return SubspaceBasis(left[:, kept:].contiguous(), "retain")
    return SubspaceBasis(left[:, :kept].contiguous(), "remove")


def update_basis(memory: SubspaceBasis, covariance: torch.Tensor, threshold: float, energy: Energy, dual: bool) -> SubspaceBasis:
    """DualGPM (dual=True) or plain GPM (dual=False) update with a new task's covariance (InfLoRA's rule)."""
    covariance = covariance.float()
    dim = covariance.shape[0]
    total = _energy(torch.linalg.svdvals(covariance), energy).sum()
    if memory.flag == "remove":
        basis = memory.basis
        residual = covariance - basis @ (basis.T @ covariance)
        left, singular, _ = torch.linalg.svd(residual, full_matrices=False)
        share = _energy(singular, energy) / total
        explained = float((total - _energy(singular, energy).sum()) / total)
        added = 0
        while added < share.shape[0] and explained < threshold:
            explained += float(share[added])
            added += 1
        if added > 0:
            basis = torch.cat([basis, left[:, :added]], dim=1)[:, :dim]
        if dual and basis.shape[1] > dim / 2:
            full_left, _, _ = torch.linalg.svd(basis, full_matrices=True)
            return SubspaceBasis(full_left[:, basis.shape[1] :].contiguous(), "retain")
        return SubspaceBasis(basis.contiguous(), "remove")
    complement = memory.basis
    remaining = complement @ (complement.T @ covariance)
    left, singular, _ = torch.linalg.svd(remaining, full_matrices=False)
    share = _energy(singular, energy) / total
    left_over = float(_energy(singular, energy).sum() / total)
    removed = 0
    while removed < share.shape[0] and left_over >= 1 - threshold:
        left_over -= float(share[removed])
        removed += 1
    if removed == 0:
        return memory
    moved = left[:, :removed]
    shrunk = complement - moved @ (moved.T @ complement)
    new_left, _, _ = torch.linalg.svd(shrunk, full_matrices=False)
    return SubspaceBasis(new_left[:, : complement.shape[1] - removed].contiguous(), "retain")


def threshold_for_task(task_number: int, num_tasks: int, start: float, end: float) -> float:
    """InfLoRA's rising threshold: eps_t = start + (end - start) (t - 1) / T, t counted from 1."""
    return start + (end - start) * (task_number - 1) / max(num_tasks, 1)


__all__ = [
    "SubspaceBasis",
    "collect_input_covariances",
    "design_down_projection",
    "first_basis",
    "threshold_for_task",
    "update_basis",
]
