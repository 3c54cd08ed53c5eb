"""Fused projections split into named parts: exact function, rules and their errors, adapters on parts,
folding part LoRAs into a PEFT LoRA on the fused layer, joined backbone states, runs on ModernBERT."""

from __future__ import annotations

import pytest
import torch
from helpers import accuracy_by_hand, tiny_config, tiny_text_stream
from torch import nn

from loracl.adapters import FusedProjection, inject_adapters, join_fused_projections, split_fused_projections
from loracl.adapters.fused import fold_part_pairs, fused_layouts, join_part_states, split_part_states
from loracl.adapters.lora import LoraLayer
from loracl.adapters.peft_io import LoraPair
from loracl.backbones.registry import load_backbone
from loracl.cli import main
from loracl.config import validate_config
from loracl.errors import LoraclError


class Attention(nn.Module):
    """timm's ViT attention (its class name too): one fused qkv Linear, rows [q; k; v], reshaped per head."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, h]
        attended = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, h]
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class TinyTimmVit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": Attention()}) for _ in range(2)])
        self.mlp_in = nn.Linear(12, 36)  # out = 3 x in, but not named like a fused projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["attn"](x)
        return self.mlp_in(x)


def test_auto_split_keeps_the_function_and_the_weights_and_joins_back_bit_for_bit():
    model = TinyTimmVit()
    original = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(2, 5, 12)
    before = model(x)
    layouts = split_fused_projections(model, "auto")
    assert layouts == {f"blocks.{i}.attn.qkv": [("q", 12), ("k", 12), ("v", 12)] for i in range(2)}
    assert isinstance(model.blocks[0]["attn"].qkv, FusedProjection) and isinstance(model.mlp_in, nn.Linear)
    assert torch.allclose(model(x), before, atol=1e-6)
    fused = original["blocks.1.attn.qkv.weight"]
    assert torch.equal(model.blocks[1]["attn"].qkv.k.weight, fused[12:24])
    assert torch.equal(model.blocks[1]["attn"].qkv.v.bias, original["blocks.1.attn.qkv.bias"][24:])
    state = join_part_states(model.state_dict(), layouts)
    assert set(state) == set(original) and all(torch.equal(state[key], original[key]) for key in original)
    again = split_part_states(state, layouts)
    assert set(again) == set(model.state_dict()) and all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    assert join_fused_projections(model) == list(layouts)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in original.items())


def test_auto_leaves_interleaved_layouts_whole():
    """CodeGen's qkv_proj (q, v, k interleaved over shards) has out = 3 x in too, but its thirds are not q, k, v."""

    class CodeGenAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj = nn.Linear(12, 36)

    model = nn.ModuleDict({"attn": CodeGenAttention()})
    assert split_fused_projections(model, "auto") == {}
    assert split_fused_projections(model, {"qkv_proj": ["a", "b", "c"]}) == {"attn.qkv_proj": [("a", 12), ("b", 12), ("c", 12)]}


def test_explicit_rules_equal_blocks_and_sizes():
    model = TinyTimmVit()
    layouts = split_fused_projections(model, {"blocks.0.attn.qkv": ["query", "key", "value"], "mlp_in": {"gate": 24, "up": 12}})
    assert layouts["mlp_in"] == [("gate", 24), ("up", 12)] and "blocks.1.attn.qkv" not in layouts
    assert model.mlp_in.gate.weight.shape == (24, 12)
    assert split_fused_projections(TinyTimmVit(), "off") == {}


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"nowhere": ["q", "v"]}, "no module named `nowhere`"),
        ({"qkv": ["a", "b", "c", "d", "e"]}, "not divisible into 5 equal parts"),
        ({"qkv": {"q": 12, "k": 12}}, "summing to 24; the layer has 36"),
        ({"qkv": {"q": 0, "k": 24, "v": 12}}, "at least one row"),
        ({"qkv": ["q", "q", "v"]}, "two distinct part names"),
        ({"qkv": ["all"]}, "two distinct part names"),
        ({"qkv": ["q", "k-proj", "v"]}, "not a valid module name"),
        ({"blocks.0.attn": ["q", "v"]}, "only nn.Linear layers can be split"),
        ("sometimes", "must be 'auto', 'off'"),
    ],
)
def test_bad_split_rules_name_the_culprit(rule, message):
    with pytest.raises(LoraclError, match=message):
        split_fused_projections(TinyTimmVit(), rule)


def test_targeting_a_split_projection_names_its_parts():
    model = TinyTimmVit()
    split_fused_projections(model, "auto")
    with pytest.raises(LoraclError, match=r"split into parts \['q', 'k', 'v'\]: target the parts"):
        inject_adapters(model, ["qkv"], lambda module, name: LoraLayer(module, name))
    with pytest.raises(LoraclError, match="fused projection"):
        inject_adapters(model, r".*attn\.qkv", lambda module, name: LoraLayer(module, name))
    from loracl.adapters import find_target_modules

    assert find_target_modules(model, r".*qkv.*") == [f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in "qkv"]


def test_lora_on_parts_merges_exactly_and_folds_into_one_peft_lora_on_the_fused_layer():
    model = TinyTimmVit()
    x = torch.randn(2, 5, 12)
    layouts = split_fused_projections(model, "auto")
    frozen = {key: value.clone() for key, value in model.state_dict().items()}
    layers = inject_adapters(model, ["q", "v"], lambda module, name: LoraLayer(module, name))
    assert sorted(layers) == sorted(f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in "qv")
    generator = torch.Generator().manual_seed(1)
    for index, layer in enumerate(layers.values()):
        branch = layer.add_branch("task_0", 2 + index % 2, alpha=4.0)
        with torch.no_grad():
            branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=generator))
    adapted = model(x)
    assert not torch.allclose(adapted, TinyTimmVit()(x), atol=1e-4)
    for layer in layers.values():
        layer.merge()
    assert torch.allclose(model(x), adapted, atol=1e-5)
    for layer in layers.values():
        layer.unmerge()
    assert all(torch.allclose(model.state_dict()[key.replace(".q.", ".q.base_layer.").replace(".v.", ".v.base_layer.")], value, atol=1e-6)
               for key, value in frozen.items())
    pairs = {name: LoraPair(layer.branches["task_0"].lora_A.data, layer.branches["task_0"].lora_B.data, layer.branches["task_0"].scaling)
             for name, layer in layers.items()}
    folded = fold_part_pairs({**pairs, "elsewhere": pairs["blocks.0.attn.qkv.q"]}, layouts)
    assert sorted(folded) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "elsewhere"]
    for block in range(2):
        pair = folded[f"blocks.{block}.attn.qkv"]
        delta = pair.scaling * pair.lora_B @ pair.lora_A  # [36, 12]
        q, v = pairs[f"blocks.{block}.attn.qkv.q"], pairs[f"blocks.{block}.attn.qkv.v"]
        assert torch.allclose(delta[:12], q.scaling * q.lora_B @ q.lora_A, atol=1e-6)
        assert torch.equal(delta[12:24], torch.zeros(12, 12))
        assert torch.allclose(delta[24:], v.scaling * v.lora_B @ v.lora_A, atol=1e-6)
        assert pair.lora_A.shape[0] == q.lora_A.shape[0] + v.lora_A.shape[0]


def test_modernbert_auto_split_keeps_the_function():
    split = load_backbone("tiny-modernbert")
    whole = load_backbone("tiny-modernbert", split_fused="off")
    inputs = split.collate(["hello there", "a b"])
    assert torch.allclose(split(**inputs), whole(**inputs), atol=1e-6)
    assert sorted(fused_layouts(split.model)) == ["layers.0.attn.Wqkv", "layers.1.attn.Wqkv"]
    assert isinstance(split.model.layers[0].mlp.Wi, nn.Linear)  # 3 x hidden rows, but GLU halves, not q/k/v


@pytest.mark.parametrize(
    "method, parts",
    [
        ("inc_lora", ["q", "v"]),
        ("o_lora", ["q", "v"]),
        ("sd_lora", ["q", "v"]),
        ("oa_adapter", ["q", "v"]),
        ("inflora", ["k", "v"]),
        ("fm_lora", ["q", "v"]),
        ("metalora", ["q", "v"]),
        ("lorac_ipc", ["Wi", "Wo", "k", "q", "v"]),
    ],
)
def test_methods_adapt_the_parts_their_spec_names_and_run_to_the_end(tmp_path, method, parts):
    from loracl.adapters.base import AdapterLayer
    from loracl.engine import run_experiment

    stream = tiny_text_stream(2)
    [result] = run_experiment(tiny_config(method, backbone="tiny-modernbert"), tmp_path, stream=stream)
    adapted = sorted({name.rsplit(".", 1)[-1] for name, module in result.method.model.backbone.model.named_modules() if isinstance(module, AdapterLayer)})
    assert adapted == parts
    # ran to the end: the last row is the final model's accuracy on each task, recomputed outside the engine
    assert len(result.accuracy_matrix) == 2
    assert result.accuracy_matrix[-1] == pytest.approx([accuracy_by_hand(result.method, task) for task in stream.tasks])


def test_export_of_a_modernbert_run_loads_in_peft_on_the_unsplit_model(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from loracl.engine import run_experiment

    config = tiny_config("inc_lora", backbone="tiny-modernbert", train={"base_session_epochs": 1})
    [result] = run_experiment(config, tmp_path / "out", stream=tiny_text_stream(2))
    assert main(["export", str(tmp_path / "out" / "inc_lora"), "--out", str(tmp_path / "peft")]) == 0
    whole = load_backbone("tiny-modernbert", split_fused="off")
    saved = load_file(str(tmp_path / "out" / "inc_lora" / "checkpoints" / "task_0" / "backbone.safetensors"))
    assert "model.layers.0.attn.Wqkv.weight" in saved  # the base-session backbone under the original keys
    whole.load_state_dict(saved)
    peft_model = PeftModel.from_pretrained(whole.model, str(tmp_path / "peft")).eval()
    inputs = whole.collate(["the cat sat", "on a mat, quietly"])
    ours = result.method.model.backbone.eval()(**inputs)
    theirs = whole.pool_tokens(peft_model(**inputs).last_hidden_state, inputs)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # a finished run loaded again: the joined backbone file is split again into the same weights
    [resumed] = run_experiment(config, tmp_path / "out", stream=tiny_text_stream(2))
    assert torch.allclose(resumed.method.model.backbone.eval()(**inputs), ours, atol=1e-6)



def test_resume_under_a_reordered_rule_is_refused(tmp_path):
    """{q, k, v} and {k, q, v} give one fingerprint (keys are sorted) but other rows per part: refused on resume."""
    from loracl.engine import run_experiment

    def config(rule):
        backbone = {"name": "tiny-modernbert", "split_fused": {"Wqkv": rule}}
        return tiny_config("inc_lora", backbone="tiny-modernbert").model_copy(
            update={"backbone": validate_config({"backbone": backbone}).backbone}
        )

    run_experiment(config({"q": 32, "k": 32, "v": 32}), tmp_path, stream=tiny_text_stream(2))
    with pytest.raises(LoraclError, match="split as"):
        run_experiment(config({"k": 32, "q": 32, "v": 32}), tmp_path, stream=tiny_text_stream(2))


def test_fusing_run_branches_writes_fused_names_and_the_host_serves_both_namings(tmp_path):
    """A run's branches name the parts (the host splits its base model alike); the fused PEFT folder names the
    fused layer (a host given such an adapter joins the projection back); both serve the task's own features."""
    from peft import PeftModel

    from loracl.adapters.peft_io import read_peft_adapter
    from loracl.engine import run_experiment
    from loracl.fusion import LoraHost, read_run_branch

    [result] = run_experiment(tiny_config("inc_lora", backbone="tiny-modernbert"), tmp_path / "out", stream=tiny_text_stream(2))
    adapter = read_run_branch(tmp_path / "out" / "inc_lora", 1)
    assert sorted(adapter.pairs) == [f"layers.{i}.attn.Wqkv.{p}" for i in range(2) for p in "qv"]
    out = tmp_path / "fused"
    assert main(["fuse", "--run", str(tmp_path / "out" / "inc_lora"), "--tasks", "1", "--method", "linear", "--out", str(out)]) == 0
    PeftModel.from_pretrained(load_backbone("tiny-modernbert", split_fused="off").model, str(out))
    _, folded = read_peft_adapter(out)
    assert sorted(folded) == ["layers.0.attn.Wqkv", "layers.1.attn.Wqkv"]
    inputs = load_backbone("tiny-modernbert").collate(["the cat sat"])
    with torch.no_grad():
        result.method.model.eval()
        for layer in result.method.layers.values():
            layer.disabled_branches = {"task_0"}
        own = result.method.model.backbone(**inputs).mean(0)
        split_host = LoraHost(load_backbone("tiny-modernbert"), sorted(adapter.pairs))
        assert isinstance(split_host.backbone.model.layers[0].attn.Wqkv, FusedProjection)
        joined_host = LoraHost(load_backbone("tiny-modernbert"), sorted(folded))
        assert isinstance(joined_host.backbone.model.layers[0].attn.Wqkv, LoraLayer)
        assert torch.allclose(split_host.task_vector(adapter.pairs, inputs), own, atol=1e-5)
        assert torch.allclose(joined_host.task_vector(folded, inputs), own, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "linear", "cat"])
def test_fusing_part_loras_of_mixed_ranks_works_per_part_and_loads_in_peft(tmp_path, method):
    """all-linear on a split model: Wqkv's parts and the other layers; fused per part, folded when written."""
    from peft import PeftModel

    from loracl.engine import run_experiment
    from loracl.fusion import fuse, read_run_branch

    config = tiny_config({"name": "inc_lora", "target_modules": "all-linear"}, backbone="tiny-modernbert")
    run_experiment(config, tmp_path / "out", stream=tiny_text_stream(2))
    out = tmp_path / "fused"
    assert main(["fuse", "--run", str(tmp_path / "out" / "inc_lora"), "--method", method, "--out", str(out)]) == 0
    PeftModel.from_pretrained(load_backbone("tiny-modernbert", split_fused="off").model, str(out))
    adapters = [read_run_branch(tmp_path / "out" / "inc_lora", task) for task in range(2)]
    per_part = fold_part_pairs(fuse(adapters, method).adapter, adapters[0].layouts)
    from loracl.adapters.peft_io import read_peft_adapter

    _, written = read_peft_adapter(out)
    for name, pair in per_part.items():  # the CLI wrote exactly the per-part fusion, folded
        delta = pair.scaling * pair.lora_B @ pair.lora_A
        assert torch.allclose(written[name].scaling * written[name].lora_B @ written[name].lora_A, delta, atol=1e-6)


def test_split_rule_errors_from_the_cli_exit_2_and_leave_nothing(tmp_path, capsys):
    import yaml

    config_file = tmp_path / "config.yaml"
    config = {"backbone": {"name": "tiny-modernbert", "split_fused": {"Wqkv": ["q", "k"], "nowhere": ["a", "b"]}},
              "stream": {"source": "packaged"}, "method": [{"name": "inc_lora"}]}
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out)]) == 2
    assert "split_fused" in capsys.readouterr().err and not out.exists()


def test_split_fused_default_leaves_the_run_fingerprint_unchanged():
    config = tiny_config("inc_lora")
    assert "split_fused" not in config.backbone.fingerprint_dump()
    off = validate_config({"backbone": {"name": "tiny-bert", "split_fused": "off"}})
    assert off.backbone.fingerprint_dump()["split_fused"] == "off"
