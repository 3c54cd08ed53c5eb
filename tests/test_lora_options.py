"""Shared LoRA and routing options (seq_lora, inc_lora, o_lora): each option, set away from its default, changes what it should."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import attached, seeded

from loracl.adapters.lora import LoraBranch
from loracl.methods.base import LoraMethod
from loracl.methods.mean_router import MeanRouter

LORA_METHODS = ["seq_lora", "inc_lora", "o_lora"]


def lora_branches(method: LoraMethod) -> list[LoraBranch]:
    """Every LoRA branch of every adapted layer, layer by layer."""
    return [branch for layer in method.layers.values() for branch in layer.branches.values()]


def two_class_router(name: str, **options: object) -> tuple[MeanRouter, torch.Tensor]:
    """Method `name` with routed inference and a router that recorded one task of two well-separated classes
    (features near 3 e_0 and 3 e_1); returns the router and those 20 features."""
    method = attached(name, routed_inference=True, **options)
    features = torch.cat(
        [seeded(10, 32, seed=5, scale=0.1) + 3.0 * torch.eye(32)[0], seeded(10, 32, seed=6, scale=0.1) + 3.0 * torch.eye(32)[1]]
    )
    labels = torch.tensor([0] * 10 + [1] * 10)
    method.router.record_task(0, [0, 1], [(features, labels)])
    return method.router, features


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_gaussian_init_draws_a_with_std_one_over_r(name, first):
    """Rank 2: N(0, 1/r^2) has std 0.5; Kaiming-uniform on fan-in 32 stays within 1/sqrt(32) ~ 0.18."""
    bound = 1.0 / math.sqrt(32)
    for init in ("kaiming", "gaussian"):
        method = attached(name, rank=2, init=init)
        method.begin_task(first)
        values = torch.cat([branch.lora_A.detach().flatten() for branch in lora_branches(method)])
        assert values.numel() == 4 * 2 * 32
        if init == "gaussian":
            assert values.std().item() == pytest.approx(0.5, rel=0.15) and values.abs().max() > 2 * bound
        else:
            assert values.abs().max() <= bound


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_use_rslora_scales_each_branch_by_alpha_over_sqrt_r(name, first):
    outputs = {}
    for rslora in (False, True):
        method = attached(name, rank=4, alpha=32.0, use_rslora=rslora)
        method.begin_task(first)
        branch = lora_branches(method)[0]
        assert branch.scaling == (16.0 if rslora else 8.0)
        with torch.no_grad():
            branch.lora_B.copy_(seeded(*branch.lora_B.shape, seed=1))
        branch.eval()
        outputs[rslora] = branch(seeded(3, 32, seed=2)).detach()
    assert outputs[False].abs().max() > 0
    assert torch.allclose(outputs[True], 2.0 * outputs[False], atol=1e-6)  # sqrt(r) = 2 times the alpha / r output


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_target_modules_query_adapts_only_the_query_projections(name):
    query_only = attached(name, target_modules=["query"])
    default = attached(name)
    assert sorted(query_only.layers) == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    assert len(default.layers) == 4 and any(site.endswith("value") for site in default.layers)


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_router_cosine_scores_by_cosine_similarity_to_the_class_means(name):
    router, features = two_class_router(name, router="cosine")
    assert router.metric == "cosine"
    at_means = torch.nn.functional.normalize(router.means.means(), dim=-1)
    scores = router.slot_scores(at_means)  # a slot's own mean direction: cosine 1
    assert torch.allclose(scores.diagonal(), torch.ones(2), atol=1e-5)
    mahalanobis, _ = two_class_router(name)  # minus a squared distance: never positive
    assert mahalanobis.metric == "mahalanobis" and (mahalanobis.slot_scores(at_means) <= 0).all()


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_router_shrinkage_one_makes_the_precision_a_multiple_of_identity(name):
    full, _ = two_class_router(name, router_shrinkage=1.0)
    assert full.shrinkage == 1.0
    precision = full.precision()
    assert torch.allclose(precision, precision[0, 0] * torch.eye(32), atol=1e-4 * precision[0, 0].item())
    default, _ = two_class_router(name)
    other = default.precision()
    assert not torch.allclose(other, other[0, 0] * torch.eye(32), atol=1e-2 * other[0, 0].item())
