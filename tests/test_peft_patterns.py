"""PEFT adapters with rsLoRA scaling, per-module ranks (rank_pattern) and alphas (alpha_pattern) are read with
PEFT's own scaling, fused exactly and written back so that PEFT reloads them; DoRA, lora_bias and broken files
are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from loracl.backbones.registry import load_backbone
from loracl.errors import LoraclError
from loracl.fusion import fuse, read_adapter

peft = pytest.importorskip("peft")


def peft_adapter(folder, seed: int, **settings):  # noqa: ANN001, ANN201 - a path and PEFT LoraConfig settings
    """A PEFT LoRA on tiny-bert's query/value with non-zero B, saved by PEFT itself; returns the PEFT model."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_backbone("tiny-bert", seed=0).model, peft.LoraConfig(target_modules=["query", "value"], **settings))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    model.save_pretrained(str(folder))
    return model


def merged_delta(model) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a PeftModel
    """Each adapted module's delta as PEFT computes it (get_delta_weight), by module name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            out[name.split("base_model.model.", 1)[-1]] = module.get_delta_weight("default").detach()
    return out


SETTINGS = {
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "patterns": {"r": 4, "lora_alpha": 8, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 3.0}},
    "rslora+patterns": {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"query": 3}, "alpha_pattern": {"value": 5.0}},
}


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_read_gives_peft_deltas_and_a_fused_sum_reloads_in_peft(kind: str, tmp_path) -> None:
    from loracl.adapters.peft_io import write_peft_adapter
    from loracl.fusion.adapters import delta_weights

    models = [peft_adapter(tmp_path / f"a{seed}", seed, **SETTINGS[kind]) for seed in range(2)]
    adapters = [read_adapter(tmp_path / f"a{seed}") for seed in range(2)]
    expected = [merged_delta(model) for model in models]
    for adapter, deltas in zip(adapters, expected):
        ours = delta_weights(adapter.pairs)
        assert set(ours) == set(deltas)
        for name in deltas:
            assert torch.allclose(ours[name], deltas[name], atol=1e-6), name
    fused = fuse(adapters, "cat", {"weights": [1.0, 1.0]})  # the exact sum of the two deltas
    folder = write_peft_adapter(fused.adapter, tmp_path / "fused")
    reloaded = peft.PeftModel.from_pretrained(load_backbone("tiny-bert", seed=0).model, str(folder))
    for name, delta in merged_delta(reloaded).items():
        assert torch.allclose(delta, expected[0][name] + expected[1][name], atol=1e-5), name


@pytest.mark.parametrize("setting,message", [({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "lora_bias")])
def test_dora_and_lora_bias_are_refused_in_one_line(setting, message, tmp_path) -> None:
    peft_adapter(tmp_path / "a", 0, r=2, **setting)
    with pytest.raises(LoraclError, match=message) as error:
        read_adapter(tmp_path / "a")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["truncated weights", "config is a list"])
def test_broken_adapter_folders_are_refused_in_one_line(damage, tmp_path) -> None:
    peft_adapter(tmp_path / "a", 0, r=2)
    if damage == "truncated weights":
        weights = tmp_path / "a" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
    else:
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(LoraclError) as error:
        read_adapter(tmp_path / "a")
    assert "\n" not in str(error.value)
