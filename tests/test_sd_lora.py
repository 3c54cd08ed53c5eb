"""SD-LoRA (baselines.md Part 4): normalised frozen directions, shared learnable magnitudes, reset switch, merge."""

import pytest
import torch
from helpers import synthetic_text_tasks, tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig, validate_config
from loracl.data.stream import build_stream
from loracl.engine import run_experiment
from loracl.errors import ConfigError
from loracl.methods.base import MethodContext
from loracl.methods.registry import create_method


def build(**options):
    backbone = load_backbone("tiny-bert", "auto", 32, seed=0, local_files_only=True)
    model = ContinualClassifier(backbone).eval()
    method = create_method("sd_lora", options, MethodContext(HeadConfig(), TrainConfig(), seed=0, num_tasks=3))
    method.attach(model)
    stream = build_stream(synthetic_text_tasks(3, train=8, test=4), scenario="class_incremental")
    batch = {"inputs": backbone.collate(stream.tasks[0].train.inputs), "labels": torch.tensor(stream.tasks[0].train.labels)}
    return method, model, stream, batch


def train_steps(method, batch, task, steps=2):
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9)
    batch = {**batch, "labels": torch.tensor(task.class_ids[:1] * len(batch["labels"]))}
    for _ in range(steps):
        loss = method.task_loss(method.forward(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_layer_output_is_the_decoupled_formula_for_both_norms():
    for norm in ("factor", "product"):
        method, model, stream, batch = build(norm=norm)
        for task in stream.tasks[:2]:
            method.begin_task(task)
            with torch.no_grad():
                for layer in method.layers.values():
                    layer.branches[f"task_{task.index}"].lora_B.normal_(0, 0.1)
        with torch.no_grad():
            method.magnitudes["task_0"].fill_(1.7)
            method.magnitudes["task_1"].fill_(0.3)
        name, layer = next(iter(method.layers.items()))
        x = torch.randn(5, layer.in_features)
        A0, B0 = layer.branches["task_0"].lora_A, layer.branches["task_0"].lora_B
        A1, B1 = layer.branches["task_1"].lora_A, layer.branches["task_1"].lora_B
        n0 = B0.norm() * A0.norm() if norm == "factor" else (B0 @ A0).norm()
        expected = layer.base_layer(x) + 1.7 * x @ (B0 @ A0).T / n0 + 0.3 * x @ (B1 @ A1).T  # scale s = 1
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_magnitudes_shared_trainable_and_reset_in_code_mode_kept_in_paper_mode():
    for reset in (True, False):
        method, model, stream, batch = build(reset_magnitudes=reset)
        method.begin_task(stream.tasks[0])
        train_steps(method, batch, stream.tasks[0])
        learned = method.magnitudes["task_0"].item()
        assert learned != pytest.approx(0.8)
        method.begin_task(stream.tasks[1])
        assert method.magnitudes["task_0"].item() == pytest.approx(0.8 if reset else learned)
        assert method.magnitudes["task_1"].item() == pytest.approx(0.8)
        trainable = {id(p) for p in method.trainable_parameters()}
        assert id(method.magnitudes["task_0"]) in trainable and id(method.magnitudes["task_1"]) in trainable
        # one scalar per task for all layers: the layers read the very same parameter
        assert all(layer.magnitude_of("task_0") is method.magnitudes["task_0"] for layer in method.layers.values())


def test_old_directions_bit_identical_trainable_count_and_merge():
    method, model, stream, batch = build()
    method.begin_task(stream.tasks[0])
    train_steps(method, batch, stream.tasks[0])
    method.begin_task(stream.tasks[1])
    frozen = {key: value.clone() for key, value in model.state_dict().items() if "branches.task_0." in key or "base_layer" in key}
    per_task = sum(10 * (layer.in_features + layer.out_features) for layer in method.layers.values())
    classes = len(stream.tasks[1].class_ids)
    assert sum(p.numel() for p in method.trainable_parameters()) == per_task + 2 + classes * 33  # + alpha_1, alpha_2
    old_magnitude = method.magnitudes["task_0"].item()
    train_steps(method, batch, stream.tasks[1])
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in frozen.items())
    assert method.magnitudes["task_0"].item() != pytest.approx(old_magnitude)  # old magnitudes keep learning
    unmerged = model.features(batch["inputs"])
    for layer in method.layers.values():
        layer.merge()
    assert torch.allclose(model.features(batch["inputs"]), unmerged, atol=1e-5)
    for layer in method.layers.values():
        layer.unmerge()
    restored = model.state_dict()
    assert all(torch.allclose(restored[key], value, atol=1e-6) for key, value in frozen.items() if "base_layer" in key)
    assert torch.allclose(model.features(batch["inputs"]), unmerged, atol=1e-6)


def test_output_unchanged_when_the_first_branch_is_added():
    method, model, stream, batch = build()
    before = model.features(batch["inputs"])
    method.begin_task(stream.tasks[0])
    assert torch.equal(model.features(batch["inputs"]), before)


def test_end_to_end_with_resume_and_digits_vit(tmp_path):
    stream = tiny_text_stream(2, train=16, test=8)
    [first] = run_experiment(tiny_config("sd_lora"), tmp_path / "text", stream=stream)
    [again] = run_experiment(tiny_config("sd_lora"), tmp_path / "text", stream=stream)  # resumes from checkpoints
    assert again.accuracy_matrix == first.accuracy_matrix and len(first.accuracy_matrix) == 2
    assert again.method.magnitude_values() == first.method.magnitude_values()
    config = tiny_config({"name": "sd_lora", "rank": 4}, backbone="tiny-vit", train={"base_session_epochs": 1})
    [vit] = run_experiment(config, tmp_path / "vit", stream=tiny_digits_stream(3, max_train=24, max_test=12))
    assert set(vit.method.layers) == {f"layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert len(vit.accuracy_matrix) == 3


@pytest.mark.parametrize(
    "key,value",
    [("rank", 0), ("norm", "spectral"), ("reset_magnitudes", "yes"), ("init", "zeros"), ("alpha", 2),
     ("rank_schedule", []), ("rank_schedule", [4, 0]), ("rank_schedule", 4)],
)
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "sd_lora", key: value}})


def test_rank_schedule_gives_each_task_its_rank_and_resumes(tmp_path):
    """SD-LoRA-RR: ranks follow the schedule, its last entry repeats; trainable counts follow the ranks."""
    method, _, stream, _ = build(rank_schedule=[4, 2])
    assert [method.rank_for_task(t) for t in range(4)] == [4, 2, 2, 2]
    for task in stream.tasks:
        method.begin_task(task)
        method.end_task(task, [])
    layer = next(iter(method.layers.values()))
    assert [layer.branches[f"task_{t}"].lora_A.shape[0] for t in range(3)] == [4, 2, 2]
    config = tiny_config({"name": "sd_lora", "rank_schedule": [4, 2]})
    text_stream = tiny_text_stream(3, train=12, test=6)
    [run] = run_experiment(config, tmp_path, stream=text_stream)
    sites = len(run.method.layers)
    hidden = layer.in_features
    per_task = run.results["trainable_params_per_task"]
    # new branch 2·r·H per site + one magnitude per task so far + the task's two head rows (weights and biases)
    assert per_task == [sites * 2 * r * hidden + (t + 1) + 2 * (hidden + 1) for t, r in enumerate([4, 2, 2])]
    [again] = run_experiment(config, tmp_path, stream=text_stream)
    assert again.accuracy_matrix == run.accuracy_matrix



def _two_tasks_with_directions(kd_update="direction", threshold=1e-6, related=True):
    """Task 1's branch = 2 x task 0's B with the same A in every layer (the same direction) when `related`,
    else random; returns the method after task 1's begin, the layers' task-0 directions and the batch."""
    method, model, stream, batch = build(kd_threshold=threshold, kd_update=kd_update)
    method.begin_task(stream.tasks[0])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.branches["task_0"].lora_B.copy_(torch.randn(layer.branches["task_0"].lora_B.shape, generator=generator))
    method.end_task(stream.tasks[0], [])
    method.begin_task(stream.tasks[1])
    with torch.no_grad():
        method.magnitudes["task_1"].fill_(1.5)
        for layer in method.layers.values():
            new, old = layer.branches["task_1"], layer.branches["task_0"]
            if related:
                new.lora_A.copy_(old.lora_A)
                new.lora_B.copy_(2.0 * old.lora_B)
            else:
                new.lora_B.copy_(torch.randn(new.lora_B.shape, generator=generator))
    return method, model, stream, batch


@pytest.mark.parametrize("kd_update", ["direction", "function"])
def test_kd_absorbs_a_direction_the_earlier_ones_explain(kd_update):
    method, model, stream, batch = _two_tasks_with_directions(kd_update)
    layer = next(iter(method.layers.values()))
    x = torch.randn(4, layer.in_features)
    layer.unnormalized_branch = None  # the function the next task starts from: every direction normalised
    before = layer(x)
    layer.unnormalized_branch = "task_1"
    method.end_task(stream.tasks[1], [])
    assert method.absorbed["task_1"] == list(method.layers)
    assert torch.equal(layer.branches["task_1"].lora_B, torch.zeros_like(layer.branches["task_1"].lora_B))
    expected = 1.5 if kd_update == "function" else 1.0  # D_1 = 1 x D_0 (same factor-normalised direction)
    assert layer.assimilated["task_0"] == pytest.approx(expected, abs=1e-6)
    method.begin_task(stream.tasks[2])
    after = layer(x)
    assert torch.isfinite(after).all()
    if kd_update == "function":  # magnitudes reset at this start (code mode): compare at the old magnitudes
        with torch.no_grad():
            method.magnitudes["task_0"].fill_(0.8)
        assert torch.allclose(layer(x), before, atol=1e-5)
    merged_input = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), merged_input, atol=1e-5)
    layer.unmerge()


@pytest.mark.parametrize("kd_residual", ["absolute", "relative"])
def test_kd_residuals_match_a_brute_force_projection(kd_residual):
    """The recorded residual range equals ||D_t||^2 - ||Q^T D_t||^2 (Q: orthonormal basis of the earlier
    directions), divided by ||D_t||^2 in relative mode; nothing is absorbed below a threshold of 1e-9."""
    method, model, stream, batch = _two_tasks_with_directions(threshold=1e-9, related=False)
    method.options = method.options.model_copy(update={"kd_residual": kd_residual})
    expected = []
    for layer in method.layers.values():
        basis, _ = torch.linalg.qr(layer.direction("task_0").flatten().double().unsqueeze(1))
        target = layer.direction("task_1").flatten().double()
        residual = float(target.square().sum() - (basis.T @ target).square().sum())
        expected.append(residual / float(target.square().sum()) if kd_residual == "relative" else residual)
    method.absorb_directions("task_1")
    assert method.kd_residuals["task_1"] == pytest.approx([min(expected), max(expected)], rel=1e-6)
    assert method.absorbed["task_1"] == []
    assert all(0.0 < value <= 1.0 for value in expected)


def test_kd_keeps_unrelated_directions_and_off_by_default():
    method, model, stream, batch = _two_tasks_with_directions(related=False)
    snapshot = {name: layer.branches["task_1"].lora_B.clone() for name, layer in method.layers.items()}
    method.end_task(stream.tasks[1], [])
    assert method.absorbed["task_1"] == []
    assert all(torch.equal(layer.branches["task_1"].lora_B, snapshot[name]) for name, layer in method.layers.items())
    assert all(not layer.assimilated for layer in method.layers.values())
    plain, _, stream, _ = build()
    plain.begin_task(stream.tasks[0])
    plain.end_task(stream.tasks[0], [])
    plain.begin_task(stream.tasks[1])
    with torch.no_grad():
        for layer in plain.layers.values():
            layer.branches["task_1"].lora_A.copy_(layer.branches["task_0"].lora_A)
            layer.branches["task_1"].lora_B.copy_(torch.ones_like(layer.branches["task_1"].lora_B))
            layer.branches["task_0"].lora_B.copy_(torch.ones_like(layer.branches["task_0"].lora_B))
    plain.end_task(stream.tasks[1], [])
    assert all(layer.branches["task_1"].lora_B.abs().sum() > 0 for layer in plain.layers.values())


def test_kd_end_to_end_reports_absorptions_and_resumes(tmp_path):
    """A threshold no residual can reach absorbs every later task into the first one's directions."""
    config = tiny_config({"name": "sd_lora", "rank": 2, "kd_threshold": 10.0})
    stream = tiny_text_stream(3, train=12, test=6)
    [run] = run_experiment(config, tmp_path, stream=stream)
    metrics = run.results["method_metrics"]
    sites = len(run.method.layers)
    assert metrics["kd_absorbed_layers"] == {"task_1": sites, "task_2": sites}
    assert set(metrics["kd_assimilated"]) == set(run.method.layers)
    assert all(0.0 <= low <= high <= 1.0 + 1e-9 for low, high in metrics["kd_residual_range"].values())  # ||D|| <= 1
    [again] = run_experiment(config, tmp_path, stream=stream)
    assert again.results["method_metrics"]["kd_residual_range"] == metrics["kd_residual_range"]
    assert again.accuracy_matrix == run.accuracy_matrix
    assert again.method.assimilated_values() == run.method.assimilated_values()


def test_kd_update_without_threshold_is_refused():
    with pytest.raises(ConfigError, match="kd_update"):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "sd_lora", "kd_update": "function"}})
    with pytest.raises(ConfigError, match="kd_threshold"):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "sd_lora", "kd_threshold": 0}})
    with pytest.raises(ConfigError, match="kd_residual"):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "sd_lora", "kd_residual": "relative"}})
