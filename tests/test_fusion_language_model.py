"""`loracl fuse` on PEFT LoRA folders of a language model: instruction examples (input/output pairs) drive
ICM-Fusion's answer loss, the fused adapter is a PEFT folder that PEFT loads and that generates what loracl's own
LoRA layers generate with the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from loracl.backbones.registry import load_backbone
from loracl.cli import main
from loracl.data.stream import RawTask, build_stream
from loracl.engine import run_experiment
from loracl.engine.export import export_run_task

TASKS = {
    "colour": [("a ruby", "red"), ("the sea", "blue")],
    "size": [("an elephant", "big"), ("an ant", "small")],
}
SMALL_ICM = ["--set", "icm.warm_start_steps=2", "--set", "icm.meta_steps=1", "--set", "icm.latent_dim=4", "--set", "icm.channel_divisor=8",
             "--set", "icm.learned_weight_steps=2", "--set", "icm.inner_steps=1"]


@pytest.fixture(scope="module")
def task_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """One seq_lora per task on the tiny Llama, exported as PEFT folders, and each task's examples file."""
    root = tmp_path_factory.mktemp("lm_fusion")
    folders, examples = [], []
    for name, pairs in TASKS.items():
        stream = build_stream([RawTask(name, [], pairs * 4, pairs, free_form=True)])
        config = tiny_config("seq_lora", "tiny-llama", train={"max_length": 192, "lr": 1e-2, "batch_size": 4}, task_model={"kind": "language"})
        run_experiment(config, root / name, stream=stream)
        folders.append(str(export_run_task(root / name / "seq_lora", -1, root / f"{name}_adapter")))
        path = root / f"{name}.json"
        path.write_text(json.dumps([{"input": x, "output": y} for x, y in pairs]))
        examples.append(str(path))
    return root, folders, examples


def generate(model: torch.nn.Module, tokenizer, text: str) -> list[int]:  # noqa: ANN001 - a Hugging Face tokenizer
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0].tolist()


@pytest.mark.parametrize("method,extra", [("linear", []), ("ties", []), ("icm", SMALL_ICM)])
def test_fused_language_model_lora_loads_in_peft_and_generates_like_loracl(task_adapters, method, extra, tmp_path) -> None:
    from peft import PeftModel

    from loracl.adapters.peft_io import load_peft_adapter

    _, folders, examples = task_adapters
    with_examples = [argument for path in examples for argument in ("--examples", path)] if method == "icm" else []
    out = tmp_path / "fused"
    code = main(["fuse", *folders, "--method", method, "--base", "tiny-llama", *with_examples, *extra, "--out", str(out)])
    assert code == 0
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["method"] == method
    theirs = PeftModel.from_pretrained(load_backbone("tiny-llama", seed=0).model, str(out)).eval()
    ours_backbone = load_backbone("tiny-llama", seed=0)
    load_peft_adapter(ours_backbone.model, out)
    ours_backbone.model.eval()
    tokenizer = ours_backbone.tokenizer
    for text in ("a ruby", "an ant"):
        assert generate(theirs, tokenizer, text) == generate(ours_backbone.model, tokenizer, text)


def test_icm_fusion_on_a_language_model_takes_in_context_steps_on_the_answer_loss(task_adapters, tmp_path) -> None:
    """ICM-Fusion's in-context step uses each task's answer loss: a run reports it (the label-free fallback
    would report a feature MSE instead)."""
    from loracl.fusion import LoraHost, fuse, read_adapter
    from loracl.fusion.cli import answer_support, read_examples

    _, folders, examples = task_adapters
    adapters = [read_adapter(folder) for folder in folders]
    backbone = load_backbone("tiny-llama", seed=0)
    host = LoraHost(backbone, sorted(adapters[0].pairs))
    supports = [answer_support(backbone, read_examples(path, 4), adapter.name) for adapter, path in zip(adapters, examples)]
    losses = []
    for adapter, support in zip(adapters, supports):
        loss, grads = host.loss_and_grads(adapter.pairs, support)
        losses.append(loss)
        assert all(torch.isfinite(pair.lora_B).all() for pair in grads.values())
        assert any(pair.lora_A.abs().sum() > 0 for pair in grads.values())
    own = float(host.eval_loss(adapters[0].pairs, [supports[0]]))
    other = float(host.eval_loss(adapters[1].pairs, [supports[0]]))
    assert own < other  # each task's own LoRA answers its task better than the other task's LoRA
    outcome = fuse(adapters, "icm", {"icm": {"warm_start_steps": 2, "meta_steps": 1, "latent_dim": 4, "channel_divisor": 8,
                                             "learned_weight_steps": 2, "inner_steps": 1}}, host=host, supports=supports)
    assert set(outcome.adapter) == set(adapters[0].pairs)


def test_instruction_examples_for_an_encoder_are_refused_in_one_line(tmp_path, capsys) -> None:
    from loracl.adapters.peft_io import LoraPair, write_peft_adapter

    pair = {"encoder.layer.0.attention.self.query": LoraPair(torch.randn(2, 32), torch.randn(32, 2), 1.0)}
    folders = [str(write_peft_adapter(pair, tmp_path / f"a{i}")) for i in range(2)]
    examples = tmp_path / "e.json"
    examples.write_text(json.dumps([{"input": "x", "output": "y"}]))
    code = main(["fuse", *folders, "--method", "icm", "--base", "tiny-bert", "--examples", str(examples), "--examples", str(examples),
                 *SMALL_ICM, "--out", str(tmp_path / "out")])
    assert code == 2
    assert "not a language model" in capsys.readouterr().err
