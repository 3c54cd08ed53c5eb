"""Our LoRA equals PEFT's numerically (unmerged and merged), and PEFT folders round-trip both ways."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from loracl.adapters import LoraLayer, adapter_layers, inject_adapters, merge_adapters, unmerge_adapters
from loracl.adapters.peft_io import load_peft_adapter, lora_layers_to_pairs, read_peft_adapter, write_peft_adapter
from loracl.backbones.registry import load_backbone
from loracl.errors import LoraclError


def tiny_bert():
    backbone = load_backbone("tiny-bert", seed=0)
    inputs = backbone.collate(["hello world", "a longer sentence here", "x"])
    return backbone.model, inputs


def randomise_b(layers, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        for branch in layer.branches.values():
            with torch.no_grad():
                branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=generator) * 0.1)


def ours_and_peft(rank=4, alpha=8.0, targets=("query", "value"), use_rslora=False):
    model, inputs = tiny_bert()
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora)
    )
    layers = inject_adapters(model, list(targets), lambda module, name: LoraLayer(module, name))
    for layer in layers.values():
        layer.add_branch("default", rank, alpha, use_rslora=use_rslora)
    randomise_b(layers)
    peft_params = dict(peft_model.named_parameters())
    for name, layer in layers.items():
        branch = layer.branches["default"]
        with torch.no_grad():
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(branch.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(branch.lora_B)
    return model, peft_model, layers, inputs


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_unmerged_and_merged(use_rslora):
    model, peft_model, _, inputs = ours_and_peft(use_rslora=use_rslora)
    model.eval(), peft_model.eval()
    ours = model(**inputs).last_hidden_state
    theirs = peft_model(**inputs).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    merge_adapters(model)
    peft_model.merge_adapter()
    assert torch.allclose(model(**inputs).last_hidden_state, ours, atol=1e-5)
    assert torch.allclose(peft_model(**inputs).last_hidden_state, ours, atol=1e-5)


def test_identity_at_initialisation_and_frozen_base():
    model, inputs = tiny_bert()
    before = model(**inputs).last_hidden_state
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = inject_adapters(model, ["query", "value"], lambda module, name: LoraLayer(module, name))
    for layer in layers.values():
        layer.add_branch("default", 4, 8.0)
    assert torch.equal(model(**inputs).last_hidden_state, before)
    assert all(not layer.base_layer.weight.requires_grad for layer in layers.values())
    assert all(layer.branches["default"].lora_A.requires_grad for layer in layers.values())
    for name, value in base_weights.items():
        parts = name.rsplit(".", 1)
        new_name = f"{parts[0]}.base_layer.{parts[1]}" if any(parts[0].endswith(t) for t in ("query", "value")) else name
        assert torch.equal(dict(model.named_parameters())[new_name], value)


def test_unmerge_restores_base_weight():
    model, _, layers, _ = ours_and_peft()
    weights = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    merge_adapters(model)
    assert any(not torch.equal(layer.base_layer.weight, weights[name]) for name, layer in layers.items())
    unmerge_adapters(model)
    for name, layer in layers.items():
        assert torch.allclose(layer.base_layer.weight, weights[name], atol=1e-6)


def test_parameter_count_formula():
    model, _, layers, _ = ours_and_peft(rank=4)
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in layers.values())
    assert sum(layer.branches["default"].parameter_count() for layer in layers.values()) == expected


def test_export_loads_in_peft_with_identical_outputs(tmp_path):
    model, _, layers, inputs = ours_and_peft()
    expected = model(**inputs).last_hidden_state
    write_peft_adapter(lora_layers_to_pairs(layers), tmp_path / "adapter")
    base, _ = tiny_bert()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(loaded(**inputs).last_hidden_state, expected, atol=1e-5)


def test_several_branches_export_as_one_exact_pair(tmp_path):
    model, inputs = tiny_bert()
    layers = inject_adapters(model, ["query", "value"], lambda module, name: LoraLayer(module, name))
    for index, rank in enumerate([2, 3]):
        for layer in layers.values():
            layer.add_branch(f"task_{index}", rank, 4.0)
    randomise_b(layers)
    expected = model(**inputs).last_hidden_state
    write_peft_adapter(lora_layers_to_pairs(layers), tmp_path / "adapter")
    base, _ = tiny_bert()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert torch.allclose(loaded(**inputs).last_hidden_state, expected, atol=1e-5)


def test_import_of_a_peft_folder(tmp_path):
    _, peft_model, _, inputs = ours_and_peft()
    peft_model.save_pretrained(str(tmp_path / "saved"))
    expected = peft_model(**inputs).last_hidden_state
    model, _ = tiny_bert()
    load_peft_adapter(model, tmp_path / "saved")
    assert torch.allclose(model(**inputs).last_hidden_state, expected, atol=1e-5)


def test_conv2d_matches_peft_and_merges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    layers = inject_adapters(model, r"0|2", lambda module, name: LoraLayer(module, name))
    for layer in layers.values():
        layer.add_branch("default", 2, 4.0)
    randomise_b(layers)
    params = dict(peft_model.named_parameters())
    for name, layer in layers.items():
        with torch.no_grad():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.branches["default"].lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.branches["default"].lora_B)
    x = torch.randn(2, 3, 9, 9)
    ours = model(x)
    assert torch.allclose(ours, peft_model(x), atol=1e-5)
    merge_adapters(model)
    assert torch.allclose(model(x), ours, atol=1e-5)


def test_bad_targets_are_clear_errors():
    model, _ = tiny_bert()
    with pytest.raises(LoraclError, match="matched no module"):
        inject_adapters(model, ["nonexistent"], lambda module, name: LoraLayer(module, name))
    with pytest.raises(LoraclError, match="LayerNorm"):
        inject_adapters(model, r".*attention\.output\.LayerNorm", lambda module, name: LoraLayer(module, name))
    with pytest.raises(LoraclError, match="not a PEFT adapter folder"):
        read_peft_adapter("/nonexistent")


def test_all_linear_skips_heads_and_regex_is_full_match():
    model, _ = tiny_bert()
    layers = inject_adapters(model, "all-linear", lambda module, name: LoraLayer(module, name))
    assert len(layers) == 2 * 6  # q, k, v, attention out, intermediate, output per layer
    assert len(adapter_layers(model)) == 12
    model2, _ = tiny_bert()
    assert len(inject_adapters(model2, r".*\.query", lambda m, n: LoraLayer(m, n))) == 2


def test_layer_dropout_is_one_mask_for_every_branch_and_matches_peft_with_one_branch():
    base = nn.Linear(6, 5)
    shared = LoraLayer(copy.deepcopy(base), "shared", dropout=0.5)
    for name in ("a", "b"):
        shared.add_branch(name, 2, 4.0)
        with torch.no_grad():
            shared.branches[name].lora_B.normal_()
    shared.train()
    x = torch.randn(3, 6)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + shared.branches["a"](dropped) + shared.branches["b"](dropped)
    torch.manual_seed(7)
    assert torch.allclose(shared(x), expected, atol=1e-6)  # one mask; per-branch masks would differ

    single = LoraLayer(copy.deepcopy(base), "single", dropout=0.5)  # one branch: same as PEFT's lora_dropout
    single.add_branch("default", 2, 4.0)
    peft_like = LoraLayer(copy.deepcopy(base), "peft_like")
    peft_like.add_branch("default", 2, 4.0, dropout=0.5)
    peft_like.load_state_dict(single.state_dict())
    with torch.no_grad():
        for layer in (single, peft_like):
            layer.branches["default"].lora_B.fill_(0.3)
    torch.manual_seed(3)
    first = single(x)
    torch.manual_seed(3)
    assert torch.allclose(first, peft_like(x), atol=1e-6)
