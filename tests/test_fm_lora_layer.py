"""F-LoRA layer invariants (specs/fm-lora.md section 9): identity, orthonormal bases, exact folding, rank bound, merge."""

import pytest
import torch
from torch import nn

from loracl.adapters.factorized import FactorizedLoraLayer
from loracl.errors import LoraclError


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 10)


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 6, kernel_size=3, padding=1)


def _input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, 3, 5, 5, generator=generator)
    return torch.randn(4, 7, 12, generator=generator)


def _randomise_cores(layer: FactorizedLoraLayer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.core_M.copy_(torch.randn(layer.rank, layer.rank, generator=generator))
        layer.core_N.copy_(torch.randn(layer.rank, layer.rank, generator=generator))


@pytest.mark.parametrize("make", [_linear, _conv])
@pytest.mark.parametrize("mode", ["svd", "svd_minor", "random_orthogonal", "lora"])
def test_identity_at_attach_and_at_task_start(make, mode):
    base = make()
    x = _input(base)
    expected = base(x)
    layer = FactorizedLoraLayer(base, "t", rank=4, shared_basis=mode, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), expected)  # K = 0, no cores
    layer.start_task_cores()
    layer.rank_mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(layer(x), expected, atol=1e-6)  # N_t = 0, for any mask


@pytest.mark.parametrize("mode", ["svd", "svd_minor", "random_orthogonal"])
def test_bases_are_orthonormal(mode):
    layer = FactorizedLoraLayer(_linear(), "t", rank=5, shared_basis=mode, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(5)
    assert (layer.shared_A @ layer.shared_A.T - eye).abs().max() < 1e-5
    assert (layer.shared_B.T @ layer.shared_B - eye).abs().max() < 1e-5


def test_svd_basis_spans_top_right_singular_subspace():
    base = _linear()
    layer = FactorizedLoraLayer(base, "t", rank=3, shared_basis="svd")
    _, _, right_t = torch.linalg.svd(base.weight.detach().double())
    reference = right_t[:3].T @ right_t[:3]
    projector = layer.shared_A.double().T @ layer.shared_A.double()
    assert (projector - reference).abs().max() < 1e-4


@pytest.mark.parametrize("make", [_linear, _conv])
def test_folding_is_exact_and_cores_kept_trimmed(make):
    base = make()
    x = _input(base)
    layer = FactorizedLoraLayer(base, "t", rank=4, shared_basis="svd")
    cores = []
    for task, rank in enumerate([2, 3]):
        layer.start_task_cores()
        _randomise_cores(layer, seed=task)
        mask = (torch.arange(4) < rank).float()
        layer.rank_mask = mask
        before = layer(x).detach()
        cores.append((layer.core_N * mask) @ layer.core_M)
        layer.fold_task_cores(str(task), rank)
        assert torch.allclose(layer(x), before, atol=1e-5)  # cores active == K only
        assert getattr(layer.kept_cores, f"M_{task}").shape == (rank, 4)
        assert getattr(layer.kept_cores, f"N_{task}").shape == (4, rank)
    total = cores[0] + cores[1]
    assert torch.allclose(layer.accumulated_core, total, rtol=1e-6, atol=1e-6)
    rebuilt = layer.kept_task_core("0") + layer.kept_task_core("1")
    assert torch.allclose(rebuilt, total, atol=1e-5)
    weight = base.weight.detach() + layer.task_increment(layer.accumulated_core)
    summed = base.weight.detach() + layer.task_increment(cores[0]) + layer.task_increment(cores[1])
    assert torch.allclose(weight, summed, rtol=1e-6, atol=1e-6)


def test_task_increment_rank_is_bounded_by_its_mask():
    layer = FactorizedLoraLayer(_linear(), "t", rank=6, shared_basis="random_orthogonal", generator=torch.Generator().manual_seed(3))
    layer.start_task_cores()
    _randomise_cores(layer, seed=5)
    delta = layer.task_increment(layer.live_core((torch.arange(6) < 2).float())).detach()
    singular = torch.linalg.svdvals(delta.double())
    assert int((singular > 1e-6 * singular.max()).sum()) <= 2
    full = layer.task_increment(layer.live_core()).detach()
    singular = torch.linalg.svdvals(full.double())
    assert int((singular > 1e-6 * singular.max()).sum()) <= 6


@pytest.mark.parametrize("make", [_linear, _conv])
def test_merge_equals_unmerged_and_unmerge_restores_bit_for_bit(make):
    base = make()
    x = _input(base)
    original = base.weight.detach().clone()
    layer = FactorizedLoraLayer(base, "t", rank=3, shared_basis="svd")
    layer.start_task_cores()
    _randomise_cores(layer, seed=2)
    layer.fold_task_cores("0", 2)
    layer.start_task_cores()
    _randomise_cores(layer, seed=3)
    layer.rank_mask = torch.tensor([1.0, 0.0, 0.0])
    unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(base.weight, original)


def test_bad_rank_and_grouped_conv_are_refused():
    with pytest.raises(LoraclError, match="rank 13"):
        FactorizedLoraLayer(_linear(), "proj", rank=13)
    with pytest.raises(LoraclError, match="grouped"):
        FactorizedLoraLayer(nn.Conv2d(4, 4, 3, groups=2), "conv", rank=2)
    layer = FactorizedLoraLayer(_linear(), "proj", rank=2)
    with pytest.raises(LoraclError, match="no live task cores"):
        layer.fold_task_cores("0", 2)


def test_task_parameter_count_is_two_r_squared():
    layer = FactorizedLoraLayer(_linear(), "t", rank=4)
    layer.start_task_cores()
    assert layer.task_parameter_count() == 32 == layer.core_M.numel() + layer.core_N.numel()


@pytest.mark.parametrize("make", [_linear, _conv])
def test_single_core_form_identity_count_fold_and_merge(make):
    base = make()
    x = _input(base)
    expected = base(x)
    layer = FactorizedLoraLayer(base, "t", rank=4, single_core=True)
    layer.start_task_cores()
    assert layer.core_M is None and layer.live_cores() == [layer.core_N]
    assert torch.allclose(layer(x), expected, atol=1e-6)  # N_t = 0
    assert layer.task_parameter_count() == 16 == layer.core_N.numel()
    with torch.no_grad():
        layer.core_N.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    layer.rank_mask = mask
    live = layer(x)
    assert torch.allclose(layer.live_core(), layer.core_N * mask)
    layer.fold_task_cores("0", 2)
    assert not hasattr(layer.kept_cores, "M_0") and layer.kept_cores.N_0.shape == (4, 2)
    assert torch.allclose(layer(x), live, atol=1e-5)  # folding is exact
    assert torch.allclose(layer.kept_task_core("0"), layer.accumulated_core, atol=1e-6)
    assert torch.linalg.matrix_rank(layer.accumulated_core) <= 2
    layer.merge()
    assert torch.allclose(layer(x), live, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer(x), live, atol=1e-5)
