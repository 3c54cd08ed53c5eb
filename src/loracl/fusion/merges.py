"""Merge baselines: PEFT's own `add_weighted_adapter` types, task arithmetic and LoRAHub (spec section 7).

The PEFT types run inside PEFT itself on a weightless skeleton (one bias-free Linear per adapted module, with the
modules' real names and shapes), so their numbers are exactly PEFT's without needing the base model's weights.
Task arithmetic (scaled sum of the deltas) and LoRAHub's gradient-free weight search are not in PEFT: ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from loracl.adapters.peft_io import LoraPair, combine_pairs
from loracl.errors import LoraclError, MissingDependencyError
from loracl.seeding import seeded_rng

PEFT_COMBINATIONS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# TIES-style merges already average the agreeing entries (disjoint mean), so each adapter keeps weight 1;
# every other type is a weighted sum, where 1/T makes it an average.
_UNIT_WEIGHT_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
Adapter = dict[str, LoraPair]


def default_weights(combination: str, count: int) -> list[float]:
    """1 per adapter for TIES-style merges, 1/T for the weighted sums."""
    return [1.0] * count if combination in _UNIT_WEIGHT_TYPES else [1.0 / count] * count


def _skeleton(adapter: Adapter) -> nn.Module:
    """A weightless module tree with a bias-free Linear of the right shape at every adapted module's path."""
    root = nn.Module()
    for name, pair in adapter.items():
        if pair.lora_A.dim() != 2:
            raise LoraclError(f"module `{name}`: PEFT merges here support Linear LoRAs only (got a conv LoRA)")
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(pair.lora_A.shape[1], pair.lora_B.shape[0], bias=False, device="meta"))
    return root


def peft_merge(
    adapters: list[Adapter],
    combination: str,
    weights: list[float] | None = None,
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
    svd_rank: int | None = None,
) -> Adapter:
    """`LoraModel.add_weighted_adapter(combination_type=combination)` on the given adapters; the merged pairs."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    if combination not in PEFT_COMBINATIONS:
        raise LoraclError(f"unknown PEFT combination {combination!r}: use one of {', '.join(PEFT_COMBINATIONS)}")
    if not 0.0 < density <= 1.0:
        raise LoraclError(f"density must be in (0, 1], got {density}")
    weights = default_weights(combination, len(adapters)) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise LoraclError(f"{len(weights)} weights for {len(adapters)} adapters")
    modules = sorted(adapters[0])

    def config(adapter: Adapter) -> LoraConfig:  # per-module ranks and alphas: modules may differ in rank
        ranks = {name: adapter[name].lora_A.shape[0] for name in modules}
        alphas = {name: adapter[name].scaling * ranks[name] for name in modules}
        return LoraConfig(
            r=ranks[modules[0]],
            lora_alpha=alphas[modules[0]],
            target_modules=modules,
            rank_pattern=ranks,
            alpha_pattern=alphas,
            lora_dropout=0.0,
        )

    skeleton = _skeleton(adapters[0])
    model = LoraModel(skeleton.to_empty(device="cpu"), config(adapters[0]), "task_0")
    for index, adapter in enumerate(adapters):
        name = f"task_{index}"
        if index:
            model.peft_config[name] = config(adapter)
            model.inject_adapter(model.model, name)
        for module in modules:
            layer = model.model.get_submodule(module)
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(adapter[module].lora_A)
                layer.lora_B[name].weight.copy_(adapter[module].lora_B)
    names = [f"task_{index}" for index in range(len(adapters))]
    with seeded_rng(0):  # DARE drops entries at random: fixed so a merge is reproducible
        model.add_weighted_adapter(
            names,
            weights,
            "fused",
            combination_type=combination,
            svd_rank=svd_rank,
            density=density if combination not in ("linear", "cat", "svd") else None,
            majority_sign_method=majority_sign_method,
        )
    merged = {}
    for module in modules:
        layer = model.model.get_submodule(module)
        merged[module] = LoraPair(
            layer.lora_A["fused"].weight.detach().clone(),
            layer.lora_B["fused"].weight.detach().clone(),
            float(layer.scaling["fused"]),
        )
    return merged


def task_arithmetic(adapters: list[Adapter], scaling_coefficient: float = 0.3) -> Adapter:
    """Ilharco et al.: delta = lambda * sum_i s_i B_i A_i, stored exactly as one concatenated pair (rank sum r_i)."""
    merged = {}
    for module in adapters[0]:
        pairs = [adapter[module] for adapter in adapters]
        combined = combine_pairs([LoraPair(p.lora_A, p.lora_B, p.scaling * scaling_coefficient) for p in pairs])
        if len(pairs) == 1:
            combined = LoraPair(combined.lora_A, combined.lora_B * combined.scaling, 1.0)
        merged[module] = combined
    return merged


def weighted_combination(adapters: list[Adapter], weights: list[float], combine: Literal["cat", "factors"]) -> Adapter:
    """`cat`: delta = sum_i w_i s_i B_i A_i exactly; `factors`: LoRAHub's own A = sum w_i A_i, B = sum w_i B_i."""
    merged = {}
    for module in adapters[0]:
        pairs = [adapter[module] for adapter in adapters]
        if combine == "cat":
            merged[module] = combine_pairs([LoraPair(p.lora_A, p.lora_B, p.scaling * w) for p, w in zip(pairs, weights)])
            if len(pairs) == 1:
                merged[module] = LoraPair(merged[module].lora_A, merged[module].lora_B * merged[module].scaling, 1.0)
        else:
            lora_A = sum(w * p.lora_A for p, w in zip(pairs, weights))
            lora_B = sum(w * p.lora_B for p, w in zip(pairs, weights))
            merged[module] = LoraPair(lora_A, lora_B, pairs[0].scaling)
    return merged


def lorahub(
    adapters: list[Adapter],
    loss: Callable[[Adapter], float],
    budget: int = 40,
    l1_weight: float = 0.05,
    bound: float = 1.5,
    combine: Literal["cat", "factors"] = "cat",
    seed: int = 0,
) -> tuple[Adapter, list[float]]:
    """LoRAHub (Huang et al.): gradient-free search of T weights on few-shot loss + l1_weight * mean |w|.

    Uses nevergrad's NGOpt, as LoRAHub's own code does: it installs from PyPI (pure Python), so a hand-written
    CMA-ES is not worth its bugs. Weights start at 0 and live in [-bound, bound] (LoRAHub's defaults).
    """
    try:
        import nevergrad as ng
    except ImportError:
        raise MissingDependencyError("the `lorahub` fusion needs nevergrad: pip install nevergrad") from None
    import numpy as np

    parametrization = ng.p.Array(init=np.zeros(len(adapters)), lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)

    def objective(weights: np.ndarray) -> float:
        adapter = weighted_combination(adapters, [float(w) for w in weights], combine)
        return float(loss(adapter)) + l1_weight * float(np.abs(weights).mean())

    best = optimizer.minimize(objective).value
    weights = [float(w) for w in best]
    return weighted_combination(adapters, weights, combine), weights
