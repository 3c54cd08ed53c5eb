"""Layer-level invariants of the tensor adapter (spec metalora.md section 9): identity, LoRA reduction,
CP inside TR, factorised == materialised, per-sample independence, merge, parameter counts, gradient flow."""

import copy

import pytest
import torch
from torch import nn

from loracl.adapters.lora import LoraBranch
from loracl.adapters.tensor import TensorAdapterLayer
from loracl.errors import LoraclError
from loracl.methods.metalora import MappingNet

CONV_GEOMETRIES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=3, stride=2, padding=0, dilation=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    dict(kernel_size=3, stride=1, padding="same", dilation=2),
    dict(kernel_size=1, stride=2, padding=0, dilation=1),
]


def make_base(kind, geometry=None, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5).to(dtype)
    return nn.Conv2d(3, 4, **geometry).to(dtype)


def make_input(kind, batch=4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    if kind == "linear":
        return torch.randn(batch, 7, 6, generator=generator, dtype=dtype)  # [B, tokens, d_in]
    return torch.randn(batch, 3, 9, 8, generator=generator, dtype=dtype)


def randomise(block, scale=0.3):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def all_bases():
    yield "linear", make_base("linear")
    for geometry in CONV_GEOMETRIES:
        yield "conv", make_base("conv", geometry)


@pytest.mark.parametrize("decomposition", ["cp", "tr"])
@pytest.mark.parametrize("init", ["zero_out", "zero_seed"])
def test_identity_at_init_exact(decomposition, init):
    for kind, base in all_bases():
        layer = TensorAdapterLayer(copy.deepcopy(base), "slot")
        block = layer.add_block("t", decomposition=decomposition, rank=3, init=init)
        layer.active_block = "t"
        x = make_input(kind)
        layer.generated_seed = torch.zeros(4, block.seed_size)  # a fresh mapping net outputs exactly zero
        assert torch.equal(layer(x), base(x))
        if init == "zero_out":  # U / G_out = 0: zero for any seed whatsoever
            layer.generated_seed = torch.randn(4, block.seed_size)
            assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cp_without_generated_part_is_plain_lora(kind):
    base = make_base(kind, CONV_GEOMETRIES[2])
    layer = TensorAdapterLayer(copy.deepcopy(base), "slot")
    block = layer.add_block("t", decomposition="cp", rank=4, alpha=8.0, init="zero_out", cp_conv_modes=4)
    randomise(block)
    block.generated = False
    layer.active_block = "t"
    lora = LoraBranch(base, rank=4, alpha=1.0)  # scaling 1/4; fold gamma and s0 into B below
    with torch.no_grad():
        out = block.scaling * block.factor_out * block.base_seed  # B = gamma U diag(s0)
        if kind == "linear":
            lora.lora_A.copy_(block.factor_in)  # A = V^T
            lora.lora_B.copy_(out * 4)
        else:
            lora.lora_A.copy_(torch.einsum("ri,rp,rq->ripq", block.factor_in, block.factor_h, block.factor_w))
            lora.lora_B.copy_((out * 4)[:, :, None, None])
    x = make_input(kind)
    layer.generated_seed = torch.randn(4, block.seed_size)  # ignored: the block has no generated part
    torch.testing.assert_close(layer(x), base(x) + lora(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cp_is_a_special_case_of_tensor_ring(kind):
    base = make_base(kind, CONV_GEOMETRIES[0])
    cp_layer = TensorAdapterLayer(copy.deepcopy(base), "slot")
    cp = cp_layer.add_block("t", decomposition="cp", rank=3)
    randomise(cp)
    tr_layer = TensorAdapterLayer(copy.deepcopy(base), "slot")
    tr = tr_layer.add_block("t", decomposition="tr", rank=3, tr_seed="diag")
    eye = torch.eye(3)
    with torch.no_grad():
        tr.core_out.copy_(torch.einsum("ac,oa->aoc", eye, cp.factor_out))  # G_out[a,o,c] = d_ac U[o,a]
        tr.core_in.copy_(torch.einsum("ce,ci->cie", eye, cp.factor_in))  # G_in[c,i,e] = d_ce V[i,c]
        if kind == "conv":
            tr.core_h.copy_(torch.einsum("df,dp->dpf", eye, cp.factor_h))
            tr.core_w.copy_(torch.einsum("fe,fq->fqe", eye, cp.factor_w))
        tr.base_seed.copy_(cp.base_seed)
    seeds = torch.randn(4, 3)
    for layer in (cp_layer, tr_layer):
        layer.active_block, layer.generated_seed = "t", seeds
    x = make_input(kind)
    torch.testing.assert_close(tr_layer(x), cp_layer(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(decomposition="cp", cp_conv_modes=4),
        dict(decomposition="cp", cp_conv_modes=3),
        dict(decomposition="tr", tr_seed="full"),
        dict(decomposition="tr", tr_seed="diag"),
        dict(decomposition="cp", init="zero_seed"),
    ],
)
def test_factorised_forward_equals_materialised_weight(options):
    for kind, base in all_bases():
        base = base.double()
        layer = TensorAdapterLayer(base, "slot")
        block = layer.add_block("t", rank=3, **options).double()
        randomise(block)
        layer.active_block = "t"
        layer.generated_seed = torch.randn(4, block.seed_size, dtype=torch.float64)
        x = make_input(kind, dtype=torch.float64)
        fast = layer(x)
        torch.testing.assert_close(fast, layer.materialised_forward(x), atol=1e-10, rtol=0)
        if kind == "conv":
            torch.testing.assert_close(fast, layer.grouped_conv_forward(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("decomposition", ["cp", "tr"])
def test_per_sample_independence_and_permutation(decomposition):
    for kind, base in all_bases():
        layer = TensorAdapterLayer(base, "slot")
        block = layer.add_block("t", decomposition=decomposition, rank=3)
        randomise(block)
        mapping = MappingNet(5, 8, block.seed_size)
        randomise(mapping)
        layer.active_block = "t"
        x = make_input(kind)
        features = torch.randn(4, 5)

        def run(rows):
            layer.generated_seed = mapping(features[rows])
            return layer(x[rows])

        together = run(torch.arange(4))
        alone = torch.cat([run(torch.tensor([b])) for b in range(4)])
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
        permutation = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(run(permutation), together[permutation], atol=1e-6, rtol=0)


@pytest.mark.parametrize("decomposition", ["cp", "tr"])
def test_merge_only_without_generated_part(decomposition):
    for kind, base in all_bases():
        layer = TensorAdapterLayer(base, "slot")
        block = layer.add_block("t", decomposition=decomposition, rank=3)
        randomise(block)
        layer.active_block = "t"
        x = make_input(kind)
        with pytest.raises(LoraclError, match="cannot be merged"):
            layer.merge()
        assert not layer.merged
        block.generated = False
        original = base.weight.detach().clone()
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
        layer.unmerge()
        assert torch.equal(base.weight, original)


def test_parameter_counts_follow_the_cost_formulas():
    linear = nn.Linear(10, 7)
    conv = nn.Conv2d(4, 6, (3, 2))
    cases = [
        (linear, dict(decomposition="cp", rank=5), 5 * (10 + 7) + 5),
        (conv, dict(decomposition="cp", rank=5, cp_conv_modes=4), 5 * (6 + 4 + 3 + 2) + 5),
        (conv, dict(decomposition="cp", rank=5, cp_conv_modes=3), 5 * (6 + 4 + 6) + 5),
        (linear, dict(decomposition="tr", rank=3), 9 * (10 + 7) + 9),
        (linear, dict(decomposition="tr", rank=3, tr_seed="diag"), 9 * (10 + 7) + 3),
        (conv, dict(decomposition="tr", rank=3), 9 * (6 + 4 + 3 + 2) + 9),
        (linear, dict(decomposition="cp", rank=5, init="zero_seed"), 5 * (10 + 7)),
    ]
    for base, options, expected in cases:
        block = TensorAdapterLayer(copy.deepcopy(base)).add_block("t", **options)
        assert block.parameter_count() == expected, options
    mapping = MappingNet(12, 8, 20)
    assert sum(p.numel() for p in mapping.parameters()) == 2 * 12 + (12 * 8 + 8) + (8 * 20 + 20)


def _gradients(init):
    base = make_base("linear")
    layer = TensorAdapterLayer(base, "slot")
    block = layer.add_block("t", decomposition="cp", rank=3, init=init)
    mapping = MappingNet(5, 8, block.seed_size)
    layer.active_block = "t"
    features, x = torch.randn(4, 5), make_input("linear")
    optimizer = torch.optim.SGD([*block.parameters(), *mapping.parameters()], lr=0.1)

    def step():
        optimizer.zero_grad()
        layer.generated_seed = mapping(features)
        layer(x).pow(2).sum().backward()
        return block.factor_out.grad.clone(), block.factor_in.grad.clone(), mapping.out.weight.grad.clone()

    first = step()
    optimizer.step()
    return first, step()


def test_gradient_flow_zero_out():
    (u, v, w2), (u1, v1, w21) = _gradients("zero_out")
    assert u.abs().sum() > 0 and torch.equal(v, torch.zeros_like(v)) and torch.equal(w2, torch.zeros_like(w2))
    assert u1.abs().sum() > 0 and v1.abs().sum() > 0 and w21.abs().sum() > 0


def test_gradient_flow_zero_seed():
    (u, v, w2), _ = _gradients("zero_seed")
    assert w2.abs().sum() > 0
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v))


def test_bad_layer_and_block_arguments():
    with pytest.raises(LoraclError, match="grouped"):
        TensorAdapterLayer(nn.Conv2d(4, 4, 3, groups=2), "grouped")
    with pytest.raises(LoraclError, match="padding_mode"):
        TensorAdapterLayer(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "reflect")
    layer = TensorAdapterLayer(nn.Linear(3, 3), "slot")
    for bad, message in [
        (dict(decomposition="tucker"), "decomposition"),
        (dict(rank=0), "rank"),
        (dict(init="random"), "init"),
        (dict(tr_seed="half"), "tr_seed"),
        (dict(cp_conv_modes=2), "cp_conv_modes"),
    ]:
        with pytest.raises(LoraclError, match=message):
            layer.add_block("x", **bad)
    block = layer.add_block("t", rank=2)
    with pytest.raises(LoraclError, match="already has"):
        layer.add_block("t")
    layer.active_block, layer.generated_seed = "t", torch.zeros(2, 5)
    with pytest.raises(LoraclError, match="generated seed has shape"):
        layer(torch.randn(2, 3))
    assert block.seed_size == 2
