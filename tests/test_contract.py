"""The contract every registered method keeps, on a tiny text classifier, a tiny ViT and a tiny language model.

A method gets these tests by being registered (PEFT's custom-model tests are the model): a killed run resumes to
the same results; the frozen backbone is bit-identical after training; evaluation is deterministic; a method
rebuilt from its checkpoint predicts what the trained one predicted; and export either reproduces the method's
served backbone as one PEFT LoRA within 1e-5, for every task index, or is refused in one line that says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers import run_interrupted_then_resumed, tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.data.stream import RawTask, Stream, build_stream
from loracl.engine import run_experiment
from loracl.engine.export import export_run_task, restore_run_method
from loracl.engine.loaders import SplitLoader
from loracl.engine.runner import RunResult, configured_backbone
from loracl.errors import ExportRefused
from loracl.methods.registry import available_methods, method_class
from loracl.task_models import build_task_model


def instruction_stream() -> Stream:
    tasks = [
        RawTask("colour", ["red", "blue"], [("a ruby", "red"), ("the sea", "blue")] * 3, [("a ruby", "red"), ("the sea", "blue")]),
        RawTask("size", ["big", "small"], [("an elephant", "big"), ("an ant", "small")] * 3, [("an elephant", "big"), ("an ant", "small")]),
        RawTask("mood", ["glad", "sad"], [("a party", "glad"), ("a loss", "sad")] * 3, [("a party", "glad"), ("a loss", "sad")]),
    ]
    return build_stream(tasks)


@dataclass(frozen=True)
class Setting:
    backbone: str
    kind: str  # the task-model kind a method must list to run here

    def stream(self) -> Stream:
        if self.kind == "language":
            return instruction_stream()
        if self.backbone == "tiny-vit":
            return tiny_digits_stream(3, max_train=16, max_test=8)
        return tiny_text_stream(3, train=16, test=8)

    def config(self, method: str) -> Any:
        entry = {"name": method, **SMALLER.get(method, {})}
        if self.kind == "language":
            return tiny_config(entry, self.backbone, train={"max_length": 192, "lr": 1e-2, "batch_size": 4, "eval_batch_size": 8},
                               task_model={"kind": "language", "max_new_tokens": 4})
        return tiny_config(entry, self.backbone)


# Only sizes shrink here (the contract holds for every option value): ICM-Fusion's default VAE training is minutes.
SMALLER: dict[str, dict[str, Any]] = {
    "icm_fusion": {"harvest_checkpoints": 2, "fusion": {"warm_start_steps": 4, "meta_steps": 2, "learned_weight_steps": 2, "latent_dim": 8}},
}


SETTINGS = {"text": Setting("tiny-bert", "classifier"), "vision": Setting("tiny-vit", "classifier"), "language": Setting("tiny-llama", "language")}
CASES = [
    pytest.param(setting, method, id=f"{setting}-{method}")
    for setting in SETTINGS
    for method in available_methods()
    if SETTINGS[setting].kind in method_class(method).task_models
]


class Runs:
    """One uninterrupted run per case, shared by the tests (each case costs a few seconds)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.done: dict[tuple[str, str], tuple[RunResult, Stream, Any]] = {}

    def get(self, setting: str, method: str) -> tuple[RunResult, Stream, Any]:
        if (setting, method) not in self.done:
            stream = SETTINGS[setting].stream()
            config = SETTINGS[setting].config(method)
            [result] = run_experiment(config, self.root / setting / method / "whole", stream=stream)
            self.done[(setting, method)] = (result, stream, config)
        return self.done[(setting, method)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("contract"))


def test_cases_cover_every_registered_method() -> None:
    covered = {method for _, method in (case.values for case in CASES)}
    assert covered == set(available_methods())


def first_test_batch(result: RunResult, stream: Stream, task_index: int = 0) -> dict[str, Any]:
    """The first evaluation batch of a task, as the engine builds it."""
    model = result.method.model
    task = stream.tasks[task_index]

    def collate(split: Any, indices: list[int]) -> dict[str, Any]:
        return model.collate(split, indices, task, False)

    loader = SplitLoader(task.test, model.backbone, 4, task.index, shuffle=False, seed=0, device=torch.device("cpu"),
                         sort_by_length=False, split_name="test", task_name=task.name, collate=collate)
    return next(iter(loader))


@pytest.mark.parametrize("setting,method", CASES)
def test_contract_killed_run_resumes_to_the_uninterrupted_results(
    runs: Runs, setting: str, method: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Killed after task 1 trained and was evaluated but before its checkpoint landed: the resumed run redoes task 1
    and ends with the same accuracy matrix, method metrics (routing accuracy included) and trained tensors."""
    whole, stream, config = runs.get(setting, method)
    if whole.method.trains_jointly:
        pytest.skip("trains once on every task: there is no task boundary to be killed at")
    resumed = run_interrupted_then_resumed(config, tmp_path, stream, monkeypatch, crash_at=1, before_checkpoint=True)
    assert resumed.accuracy_matrix == whole.accuracy_matrix
    assert without_timings(resumed.results["method_metrics"]) == without_timings(whole.results["method_metrics"])
    states = [without_timings(record["method_state"]) for record in resumed.results["per_task"]]
    assert states == [without_timings(record["method_state"]) for record in whole.results["per_task"]]
    # tiny streams make accuracies coarse (0, 1/2, 1): the adapters, heads and buffers themselves must match too
    ours, theirs = resumed.method.state_dict(), whole.method.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.allclose(ours[key].float(), value.float(), atol=1e-6, rtol=0), (key, (ours[key].float() - value.float()).abs().max())


def without_timings(value: Any) -> Any:
    """A JSON value without its wall-clock entries (keys ending in `_s`), which no two runs share."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if not key.endswith("_s")}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def _frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own tensors under their original names (adapter wrappers hold them as `base_layer`)."""
    return {re.sub(r"\.base_layer(?=\.)", "", key): value for key, value in model.state_dict().items()}


@pytest.mark.parametrize("setting,method", CASES)
def test_contract_frozen_backbone_is_bit_identical_after_training(runs: Runs, setting: str, method: str) -> None:
    result, _, config = runs.get(setting, method)
    fresh = configured_backbone(config).model.state_dict()
    trained = _frozen_state(result.method.model.backbone.model)
    assert set(fresh) <= set(trained)
    changed = [key for key, value in fresh.items() if not torch.equal(value, trained[key])]
    assert not changed, f"pre-trained tensors changed: {changed[:5]}"


@pytest.mark.parametrize("setting,method", CASES)
def test_contract_evaluation_is_deterministic_and_a_restored_method_predicts_the_same(runs: Runs, setting: str, method: str) -> None:
    result, stream, _ = runs.get(setting, method)
    trained = result.method
    batch = first_test_batch(result, stream, task_index=len(stream) - 1)
    first, second = trained.predict(batch), trained.predict(batch)
    assert torch.equal(first, second)
    restored, _ = restore_run_method(result.run_dir, -1)
    assert torch.equal(restored.predict(batch), first)


def _served_features(task_model: Any, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return task_model.features(batch["inputs"]).float()


@pytest.mark.parametrize("setting,method", CASES)
def test_contract_export_reproduces_the_served_backbone_or_refuses_in_one_line(runs: Runs, setting: str, method: str, tmp_path: Any) -> None:
    pytest.importorskip("peft")
    from peft import PeftModel

    result, stream, config = runs.get(setting, method)
    tasks = [0] if result.method.trains_jointly else list(range(len(stream)))
    for task_index in tasks:
        restored, _ = restore_run_method(result.run_dir, task_index)
        reason = restored.export_refusal()
        if reason is not None:
            with pytest.raises(ExportRefused, match=re.escape(reason)) as refused:
                export_run_task(result.run_dir, task_index, tmp_path / f"task_{task_index}")
            assert "\n" not in str(refused.value) and method in str(refused.value)
            assert not (tmp_path / f"task_{task_index}").exists()
            continue
        folder = export_run_task(result.run_dir, task_index, tmp_path / f"task_{task_index}")
        backbone = configured_backbone(config)
        backbone.model = PeftModel.from_pretrained(backbone.model, str(folder)).base_model.model
        peft_side = build_task_model(backbone, config, config.head_for(config.method[0])).eval()
        batch = first_test_batch(result, stream, task_index)
        ours, theirs = _served_features(restored.model, batch), _served_features(peft_side, batch)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (task_index, (ours - theirs).abs().max())


@pytest.mark.parametrize("setting,method", CASES)
def test_contract_every_adapter_layer_merges_unmerges_and_disables_alike(runs: Runs, setting: str, method: str) -> None:
    """One switch API on every layer type: merge keeps the outputs, unmerge restores W0 bit for bit, a disabled
    layer is its frozen base layer."""
    from loracl.adapters import AdapterLayer, adapter_layers

    result, _, _ = runs.get(setting, method)
    layers = adapter_layers(result.method.model.backbone.model, AdapterLayer)
    generator = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        shape = (2, weight.shape[1], 6, 6) if layer.is_conv else (3, weight.shape[1])
        x = torch.randn(*shape, generator=generator, dtype=weight.dtype)
        before = weight.detach().clone()
        with torch.no_grad():
            served, bare = layer(x), layer.base_layer(x)
            layer.disabled = True
            assert torch.equal(layer(x), bare), name
            layer.disabled = False
            if layer.served_delta() is None:  # input-conditioned: merging is refused
                with pytest.raises(Exception, match="input"):
                    layer.merge()
                continue
            layer.merge()
            assert torch.allclose(layer(x), served, atol=1e-5), name
            layer.unmerge()
        assert torch.equal(weight, before), name
