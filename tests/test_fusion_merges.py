"""Merge baselines: exact sums, PEFT's own add_weighted_adapter results, PEFT loading, clear errors."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loracl.adapters.peft_io import LoraPair, write_peft_adapter
from loracl.backbones.registry import load_backbone
from loracl.cli import main
from loracl.errors import ConfigError, LoraclError
from loracl.fusion import LoraHost, TaskAdapter, TaskSupport, fuse, fuse_options
from loracl.fusion.adapters import delta_weights
from loracl.fusion.merges import peft_merge, task_arithmetic

MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
           "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]


def random_adapter(seed, rank=4, scaling=2.0, modules=MODULES):
    generator = torch.Generator().manual_seed(seed)
    return {m: LoraPair(torch.randn(rank, 32, generator=generator) * 0.2, torch.randn(32, rank, generator=generator) * 0.2, scaling) for m in modules}


def test_cat_equals_exact_weighted_sum_and_svd_full_rank_matches():
    adapters = [random_adapter(seed) for seed in range(3)]
    weights = [0.5, -0.25, 1.0]
    expected = {m: sum(w * d[m] for w, d in zip(weights, map(delta_weights, adapters))) for m in MODULES}
    cat = delta_weights(peft_merge(adapters, "cat", weights))
    svd = delta_weights(peft_merge(adapters, "svd", weights, svd_rank=12))
    for module in MODULES:
        assert torch.allclose(cat[module], expected[module], atol=1e-5)
        assert torch.allclose(svd[module], expected[module], atol=1e-4)


def test_single_adapter_is_returned_by_linear_cat_and_task_arithmetic():
    adapter = random_adapter(0)
    original = delta_weights(adapter)
    for fused in (peft_merge([adapter], "linear", [1.0]), peft_merge([adapter], "cat", [1.0]), task_arithmetic([adapter], 1.0)):
        for module, delta in delta_weights(fused).items():
            assert torch.allclose(delta, original[module], atol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "svd", "ties", "magnitude_prune", "dare_ties"])
def test_baselines_equal_peft_add_weighted_adapter_on_the_real_model(combination):
    model = load_backbone("tiny-bert", seed=0).model
    adapters = [random_adapter(seed) for seed in range(2)]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8.0, target_modules=["query", "value"]), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=4, lora_alpha=8.0, target_modules=["query", "value"]))
    parameters = dict(peft_model.named_parameters())
    for name, adapter in zip("ab", adapters):
        for module, pair in adapter.items():
            with torch.no_grad():
                parameters[f"base_model.model.{module}.lora_A.{name}.weight"].copy_(pair.lora_A)
                parameters[f"base_model.model.{module}.lora_B.{name}.weight"].copy_(pair.lora_B)
    weights = [0.7, 0.6]
    density = None if combination in ("linear", "svd") else 0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type=combination, density=density)
    ours = peft_merge(adapters, combination, weights, density=0.5)
    for module, pair in ours.items():
        layer = peft_model.base_model.model.get_submodule(module)
        assert torch.equal(pair.lora_A, layer.lora_A["merged"].weight)
        assert torch.equal(pair.lora_B, layer.lora_B["merged"].weight)
        assert pair.scaling == layer.scaling["merged"]


def test_fused_adapter_loads_in_peft_with_identical_outputs(tmp_path):
    backbone = load_backbone("tiny-bert", seed=0)
    reference = copy.deepcopy(backbone.model)
    adapters = [TaskAdapter(f"t{seed}", random_adapter(seed)) for seed in range(2)]
    fused = fuse(adapters, "ties").adapter
    write_peft_adapter(fused, tmp_path / "fused")
    inputs = backbone.collate(["hello world", "another input"])
    host = LoraHost(backbone, MODULES)
    host.set_adapter(fused)
    with torch.no_grad():
        ours = backbone.model(**inputs).last_hidden_state
        loaded = PeftModel.from_pretrained(reference, str(tmp_path / "fused")).eval()
        theirs = loaded(**inputs).last_hidden_state
        merged = loaded.merge_and_unload()(**inputs).last_hidden_state  # spec invariant 7: merging changes nothing
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(merged, theirs, atol=1e-5)


def test_lorahub_searches_weights_within_bounds_that_beat_no_adapter_reproducibly():
    """LoRAHub's objective is the mean support loss + l1_weight * mean |w|; at w = 0 (where the search starts) it is
    the loss of no adapter at all. With a small l1_weight the returned weights must score lower than that, and
    the same seed must return the same weights."""
    pytest.importorskip("nevergrad")
    backbone = load_backbone("tiny-bert", seed=0)
    adapters = [TaskAdapter(f"t{seed}", random_adapter(seed)) for seed in range(2)]
    host = LoraHost(backbone, MODULES)
    inputs = backbone.collate(["abc", "def ghi"])
    supports = []
    for adapter in adapters:
        host.set_adapter(adapter.pairs)
        with torch.no_grad():
            supports.append(TaskSupport(inputs, target_features=host.features(inputs)))
    options = {"budget": 4, "l1_weight": 0.001, "seed": 0}
    outcome = fuse(adapters, "lorahub", options, host=host, supports=supports)
    weights = outcome.report["weights"]
    assert len(weights) == 2 and all(abs(w) <= 1.5 for w in weights)
    assert outcome.report["fused_rank"] == 8  # `cat` combination: exact, rank sum
    no_adapter = {m: LoraPair(p.lora_A, torch.zeros_like(p.lora_B), p.scaling) for m, p in adapters[0].pairs.items()}
    at_zero = host.eval_loss(no_adapter, supports)
    found = host.eval_loss(outcome.adapter, supports) + 0.001 * sum(abs(w) for w in weights) / 2
    assert found < at_zero
    again = fuse(adapters, "lorahub", options, host=host, supports=supports)
    assert again.report["weights"] == weights
    assert all(torch.equal(again.adapter[m].lora_B, outcome.adapter[m].lora_B) for m in MODULES)


def test_mismatched_adapters_are_refused_naming_the_mismatch():
    base = TaskAdapter("a", random_adapter(0), "model-x")
    with pytest.raises(LoraclError, match="different ranks"):
        fuse([base, TaskAdapter("b", random_adapter(1, rank=2))], "cat")
    with pytest.raises(LoraclError, match="different modules"):
        fuse([base, TaskAdapter("b", random_adapter(1, modules=MODULES[:2]))], "cat")
    with pytest.raises(LoraclError, match="different base models"):
        fuse([base, TaskAdapter("b", random_adapter(1), "model-y")], "cat")
    with pytest.raises(LoraclError, match="unknown fusion method"):
        fuse([base], "average")


def test_bad_options_and_empty_examples_give_clear_errors():
    with pytest.raises(ConfigError, match="density"):
        fuse_options({"density": 0.0})
    with pytest.raises(ConfigError, match="unknown config key `icm.nope`"):
        fuse_options({"icm": {"nope": 1}})
    with pytest.raises(ConfigError, match="inner_steps"):
        fuse_options({"icm": {"inner_steps": -1}})
    with pytest.raises(LoraclError, match="empty"):
        TaskSupport({"input_ids": torch.zeros(0, 3, dtype=torch.long)})
    with pytest.raises(LoraclError, match="needs a base model and a few examples"):
        fuse([TaskAdapter("a", random_adapter(0))], "lorahub")


def test_cli_fuse_writes_a_peft_folder_and_bad_input_exits_2(tmp_path, capsys):
    folders = []
    for seed in range(2):
        folders.append(str(write_peft_adapter(random_adapter(seed), tmp_path / f"a{seed}")))
    assert main(["fuse", *folders, "--method", "cat", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "fusion_report.json").read_text())["method"] == "cat"
    write_peft_adapter(random_adapter(3, rank=2), tmp_path / "r2")
    assert main(["fuse", folders[0], str(tmp_path / "r2"), "--method", "ties", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "different ranks" in error[0]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code = main(["fuse", *folders, "--method", "icm", "--base", "tiny-bert", "--examples", str(empty), "--examples", str(empty), "--out", str(tmp_path / "e")])
    assert code == 2 and "no examples" in capsys.readouterr().err


def test_cli_fuse_delta_target_bad_values_exit_2_and_write_nothing(tmp_path, capsys):
    folders = [str(write_peft_adapter(random_adapter(seed), tmp_path / f"a{seed}")) for seed in range(2)]
    data_free = ["--set", "icm.task_vector=parameters", "--set", "icm.inner_steps=0", "--set", "icm.warm_start_steps=1",
                 "--set", "icm.meta_steps=0", "--set", "icm.channel_divisor=8", "--set", "icm.latent_dim=4"]
    assert main(["fuse", *folders, "--method", "icm", *data_free, "--set", "icm.target=weights", "--out", str(tmp_path / "t")]) == 2
    assert "icm.target" in capsys.readouterr().err and not (tmp_path / "t").exists()
    too_high = ["--set", "icm.target=delta", "--set", "icm.delta_rank=999"]
    assert main(["fuse", *folders, "--method", "icm", *data_free, *too_high, "--out", str(tmp_path / "d")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "delta_rank 999 exceeds" in error[0] and not (tmp_path / "d").exists()
    assert main(["fuse", *folders, "--method", "icm", *data_free, "--set", "icm.target=delta", "--out", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "fusion_report.json").read_text())["target"] == "delta"
