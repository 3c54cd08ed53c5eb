"""InfLoRA (baselines.md 3.9): the designed A, (Dual)GPM bases, interference-free training, merge, state."""

import math

import pytest
import torch
from helpers import synthetic_text_tasks, tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.adapters import LoraLayer
from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig, validate_config
from loracl.data.stream import build_stream
from loracl.engine import run_experiment
from loracl.engine.loaders import SplitLoader
from loracl.errors import ConfigError
from loracl.methods._subspace import SubspaceBasis, design_down_projection, first_basis, threshold_for_task, update_basis
from loracl.methods.base import MethodContext
from loracl.methods.registry import create_method


def build(num_tasks=3, **options):
    backbone = load_backbone("tiny-bert", "auto", 32, seed=0, local_files_only=True)
    model = ContinualClassifier(backbone).eval()
    method = create_method("inflora", options, MethodContext(HeadConfig(), TrainConfig(), seed=0, num_tasks=num_tasks))
    method.attach(model)
    stream = build_stream(synthetic_text_tasks(num_tasks, train=8, test=4), scenario="class_incremental")
    loaders = [SplitLoader(task.train, backbone, 4, task.index) for task in stream.tasks]
    return method, model, stream, loaders


def train_branch_b(method, task, loader, steps=3):
    """A few optimizer steps on the current task (B_t and the head only)."""
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=5e-2)
    for _ in range(steps):
        for batch in loader:
            loss = method.task_loss(method.forward(batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def run_task(method, task, loader):
    method.begin_task(task)
    method.prepare_task(task, loader)
    train_branch_b(method, task, loader)
    method.end_task(task, loader)


def old_dim(memory):
    return memory.basis.shape[1] if memory.flag == "remove" else memory.dim - memory.basis.shape[1]


def test_designed_a_scaled_orthonormal_shared_by_key_value_and_free_of_old_subspace():
    method, model, stream, loaders = build(lamb=0.9)
    run_task(method, stream.tasks[0], loaders[0])
    old_projectors = {leader: memory.old_projector() for leader, memory in method.bases.items()}
    method.begin_task(stream.tasks[1])
    method.prepare_task(stream.tasks[1], loaders[1])
    assert [len(group) for group in method.groups] == [2, 2]  # key and value of each block share their input
    for group in method.groups:
        downs = [method.layers[name].branches["task_1"].lora_A for name in group]
        assert torch.equal(downs[0], downs[1])
        down = downs[0]
        assert torch.allclose(down @ down.T, torch.eye(down.shape[0]) / 3, atol=1e-5)
        memory = method.bases[group[0]]
        assert memory.flag == "remove"
        assert torch.linalg.norm(down @ memory.basis) <= 1e-5
        assert torch.linalg.norm(down @ old_projectors[group[0]]) <= 1e-5
    assert not any(layer.branches["task_1"].lora_A.requires_grad for layer in method.layers.values())


def test_bases_orthonormal_bounded_and_monotone_over_tasks():
    method, model, stream, loaders = build(lamb=0.95)
    previous = {}
    for task, loader in zip(stream.tasks, loaders):
        run_task(method, task, loader)
        for leader, memory in method.bases.items():
            basis = memory.basis
            # float32 round-off grows with each task's concatenated SVD block: ~1e-5 by the third task
            assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4)
            assert basis.shape[1] <= memory.dim / 2
            old = memory.old_projector()
            if leader in previous:
                assert old_dim(memory) >= previous[leader].shape[1]  # never shrinks ...
                assert torch.allclose(old @ previous[leader], previous[leader], atol=1e-4)  # ... and keeps its span
            values, vectors = torch.linalg.eigh(old)
            previous[leader] = vectors[:, values > 0.5]  # orthonormal basis of the old-task subspace


def test_dual_switch_keeps_the_projector_and_retain_update_shrinks_the_complement():
    torch.manual_seed(0)
    dim = 12
    data = torch.randn(200, dim) * torch.linspace(3, 0.1, dim)
    covariance = data.T @ data / 200
    memory = first_basis(covariance, threshold=0.5, energy="code", dual=True)
    assert memory.flag == "remove"
    before = memory.free_projector()
    grown = update_basis(memory, covariance * 0 + torch.eye(dim), threshold=0.6, energy="code", dual=True)
    assert grown.flag == "retain" and grown.basis.shape[1] <= dim / 2
    grown_remove = update_basis(memory, covariance * 0 + torch.eye(dim), threshold=0.6, energy="code", dual=False)
    assert grown_remove.flag == "remove"
    assert torch.allclose(grown.free_projector(), grown_remove.free_projector(), atol=1e-5)  # I - MM^T == Mp Mp^T
    assert torch.allclose(grown.basis.T @ grown.basis, torch.eye(grown.basis.shape[1]), atol=1e-5)
    assert torch.allclose(before @ grown.free_projector(), grown.free_projector(), atol=1e-5)  # free space shrank
    other = torch.randn(200, dim) * 0.05 + torch.randn(200, 1) * grown.basis[:, 0]  # mostly one free direction
    shrunk = update_basis(grown, other.T @ other / 200, threshold=0.9, energy="code", dual=True)
    assert shrunk.flag == "retain" and 0 < shrunk.basis.shape[1] < grown.basis.shape[1]
    assert torch.allclose(shrunk.basis.T @ shrunk.basis, torch.eye(shrunk.basis.shape[1]), atol=1e-5)
    down, _ = design_down_projection(other.T @ other / 200, shrunk.free_projector(), rank=2)
    assert torch.linalg.norm(down @ (torch.eye(dim) - shrunk.basis @ shrunk.basis.T)) <= 1e-4


def test_interference_free_on_old_inputs():
    """Old-task inputs inside span(M): training B_t on anything leaves the layer's output on them unchanged."""
    torch.manual_seed(0)
    layer = LoraLayer(torch.nn.Linear(16, 8), "toy")
    span = torch.linalg.qr(torch.randn(16, 4))[0]
    old_inputs = torch.randn(64, 4) @ span.T  # rows in a 4-dim subspace
    memory = SubspaceBasis(span)
    new_inputs = torch.randn(64, 16)
    branch = layer.add_branch("task_1", 3, 3.0, init="none")
    with torch.no_grad():
        branch.lora_A.copy_(design_down_projection(new_inputs.T @ new_inputs / 64, memory.free_projector(), 3)[0])
    branch.lora_A.requires_grad_(False)
    reference = layer(old_inputs).detach()
    optimizer = torch.optim.SGD([branch.lora_B], lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        layer(new_inputs).pow(2).mean().neg().backward()
        optimizer.step()
    assert branch.lora_B.abs().sum() > 0
    assert torch.allclose(layer(old_inputs), reference, atol=1e-5)


def test_start_of_task_logits_trainable_count_merge_and_state_round_trip():
    method, model, stream, loaders = build()
    run_task(method, stream.tasks[0], loaders[0])
    batch = next(iter(loaders[0]))
    before = model.features(batch["inputs"])
    method.begin_task(stream.tasks[1])
    method.prepare_task(stream.tasks[1], loaders[1])
    assert torch.equal(model.features(batch["inputs"]), before)  # B_t = 0: features (so old logits) unchanged
    trainable = method.trainable_parameters()
    n_layers, d, r, classes = len(method.layers), 32, 10, len(stream.tasks[1].class_ids)
    assert sum(p.numel() for p in trainable) == n_layers * d * r + d * classes + classes
    assert all("lora_A" not in name for name, p in model.named_parameters() if p.requires_grad)
    train_branch_b(method, stream.tasks[1], loaders[1])
    method.end_task(stream.tasks[1], loaders[1])
    unmerged = method.predict(batch)
    for layer in method.layers.values():
        layer.merge()
    assert torch.allclose(method.predict(batch), unmerged, atol=1e-5)
    for layer in method.layers.values():
        layer.unmerge()

    fresh, fresh_model, _, _ = build()
    fresh.restore_structure(stream.tasks[:2])
    fresh.load_state_dict(method.state_dict())
    fresh.load_extra_state(method.extra_state())
    assert torch.equal(fresh.predict(batch), unmerged)
    for leader, memory in method.bases.items():
        assert torch.equal(fresh.bases[leader].basis, memory.basis) and fresh.bases[leader].flag == memory.flag


def test_old_branches_bit_identical_after_later_tasks():
    method, model, stream, loaders = build()
    run_task(method, stream.tasks[0], loaders[0])
    kept = {name: {key: value.clone() for key, value in layer.branches["task_0"].state_dict().items()} for name, layer in method.layers.items()}
    for task, loader in zip(stream.tasks[1:], loaders[1:]):
        run_task(method, task, loader)
    for name, layer in method.layers.items():
        assert all(torch.equal(value, kept[name][key]) for key, value in layer.branches["task_0"].state_dict().items())
        assert layer.branches["task_2"].lora_B.abs().sum() > 0  # the later tasks did train


def test_threshold_schedule():
    assert threshold_for_task(1, 10, 0.95, 1.0) == pytest.approx(0.95)
    assert threshold_for_task(10, 10, 0.95, 1.0) == pytest.approx(0.95 + 0.05 * 9 / 10)


def test_per_epoch_schedules_follow_the_code():
    cosine, _, _, _ = build()
    assert [cosine.epoch_lr_factor(e, 3) for e in range(3)] == pytest.approx([1.0, math.cos(99 * math.pi / 400), math.cos(99 * math.pi / 200)])
    assert cosine.epoch_lr_factor(2, 3) == pytest.approx(0.0157, abs=1e-4)  # ends at ~1.6 % of lr
    assert cosine.epoch_lr_factor(0, 1) == 1.0
    multistep, _, _, _ = build(lr_schedule="multistep")
    assert [multistep.epoch_lr_factor(e, 6) for e in range(6)] == [1.0, 1.0, 1.0, 1.0, 0.1, 0.1]
    constant, _, _, _ = build(lr_schedule="constant")
    assert {constant.epoch_lr_factor(e, 5) for e in range(5)} == {1.0}


def test_the_engine_applies_the_epoch_factor(tmp_path, monkeypatch):
    """An epoch whose factor is 0 changes nothing: two epochs with a silent second one equal one epoch."""
    from loracl.methods.inflora import InfLora

    stream = tiny_text_stream(2, train=8, test=4)
    [one] = run_experiment(tiny_config("inflora", train={"epochs": 1}), tmp_path / "one", stream=stream)
    monkeypatch.setattr(InfLora, "epoch_lr_factor", lambda self, epoch, epochs: 1.0 if epoch == 0 else 0.0)
    [two] = run_experiment(tiny_config("inflora", train={"epochs": 2}), tmp_path / "two", stream=stream)
    for key, value in one.method.state_dict().items():
        assert torch.equal(value, two.method.state_dict()[key]), key
    assert two.results["per_task"][0]["steps"] == 2 * one.results["per_task"][0]["steps"]


def test_plain_gpm_never_switches_and_gpm_energy_keeps_more():
    torch.manual_seed(1)
    data = torch.randn(300, 10) * torch.linspace(2, 0.5, 10)
    covariance = data.T @ data / 300
    memory = first_basis(covariance, 0.6, "code", dual=False)
    for _ in range(4):
        memory = update_basis(memory, torch.eye(10) + covariance, 0.99, "code", dual=False)
        assert memory.flag == "remove" and memory.basis.shape[1] <= 10
    assert first_basis(covariance, 0.9, "gpm", dual=False).basis.shape[1] >= first_basis(covariance, 0.9, "code", dual=False).basis.shape[1]


def test_end_to_end_text_and_digits_vit_base_session(tmp_path):
    [text] = run_experiment(tiny_config("inflora"), tmp_path / "text", stream=tiny_text_stream(3, train=16, test=8))
    assert len(text.accuracy_matrix) == 3
    assert text.results["trainable_params_per_task"][0] == 4 * 32 * 10 + 2 * 33
    log = text.results["method_metrics"]["design_log"]  # the per-task decomposition cost, outside the steps
    assert [entry["task"] for entry in log] == ["t0", "t1", "t2"]
    assert all(entry["design_s"] > 0 and entry["memory_update_s"] > 0 for entry in log)
    config = tiny_config({"name": "inflora", "rank": 4}, backbone="tiny-vit", train={"base_session_epochs": 1})
    [vit] = run_experiment(config, tmp_path / "vit", stream=tiny_digits_stream(3, max_train=24, max_test=12))
    assert set(vit.method.layers) == {f"layers.{i}.attention.{p}" for i in range(2) for p in ("k_proj", "v_proj")}
    assert len(vit.method.bases) == 2  # the base session's inputs entered the memory too
    assert all(math.isfinite(value) for row in vit.accuracy_matrix for value in row if value is not None)


@pytest.mark.parametrize(
    "key,value", [("rank", 0), ("lamb", 0.0), ("lame", 1.5), ("basis_update", "svd"), ("design", "x"), ("energy", "y"), ("alpha", 3), ("lr_schedule", "warm")]
)
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "inflora", key: value}})


def test_lame_below_lamb_is_rejected():
    with pytest.raises(ConfigError, match="lame"):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "inflora", "lamb": 0.99, "lame": 0.9}})


# ----- every switch shows its effect ----------------------------------------------------------------------------------
def old_dims_over_tasks(tasks=2, **options):
    """Size of each layer group's old-task subspace after each of the first `tasks` tasks of a 2-task stream."""
    method, _, stream, loaders = build(num_tasks=2, **options)
    dims = []
    for task, loader in list(zip(stream.tasks, loaders))[:tasks]:
        run_task(method, task, loader)
        dims.append([old_dim(memory) for memory in method.bases.values()])
    return dims


def test_lamb_and_lame_set_the_energy_thresholds_of_the_memory():
    """lamb is task 0's threshold: 0.5 keeps a strictly smaller old subspace than the default 0.95. lame is where
    the threshold rises to: it leaves task 0 alone, and after task 1 (threshold 0.5 + (lame - 0.5) / 2) lame 0.5
    keeps strictly less than lame 1.0 (energy gpm, where task 1's inputs add directions at both thresholds)."""
    [default] = old_dims_over_tasks(1)
    [low] = old_dims_over_tasks(1, lamb=0.5)
    assert all(0 < small < large for small, large in zip(low, default))
    flat = old_dims_over_tasks(energy="gpm", lamb=0.5, lame=0.5)
    rising = old_dims_over_tasks(energy="gpm", lamb=0.5, lame=1.0)
    assert flat[0] == rising[0]
    assert all(small < large for small, large in zip(flat[1], rising[1]))


def test_design_sym_and_cov_proj_pick_different_directions_by_hand():
    """Old subspace e1, C = [[10, 3, 0], [3, 1, 0], [0, 0, 2]], rank 1: P C keeps the e1-e2 coupling (its top
    left singular vector is e2, singular value sqrt(10)), P C P drops it (top eigenvector e3, eigenvalue 2)."""
    covariance = torch.tensor([[10.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    free = SubspaceBasis(torch.tensor([[1.0], [0.0], [0.0]])).free_projector()
    code, code_value = design_down_projection(covariance, free, rank=1, design="cov_proj")
    sym, sym_value = design_down_projection(covariance, free, rank=1, design="sym")
    torch.testing.assert_close(code.abs(), torch.tensor([[0.0, 1.0, 0.0]]) / 3**0.5)
    torch.testing.assert_close(sym.abs(), torch.tensor([[0.0, 0.0, 1.0]]) / 3**0.5)
    assert code_value == pytest.approx(10**0.5) and sym_value == pytest.approx(2.0)


def test_design_sym_changes_the_designed_a_of_task_1_only():
    """Task 0 has no memory, so both designs take the top directions of C; from task 1 on they differ, both free
    of the same old subspace."""
    designed = {}
    for design in ("cov_proj", "sym"):
        method, _, stream, loaders = build(num_tasks=2, design=design)
        run_task(method, stream.tasks[0], loaders[0])
        method.begin_task(stream.tasks[1])
        method.prepare_task(stream.tasks[1], loaders[1])
        designed[design] = {name: (layer.branches["task_0"].lora_A, layer.branches["task_1"].lora_A) for name, layer in method.layers.items()}
        for group in method.groups:
            memory = method.bases[group[0]]
            assert memory.flag == "remove" and torch.linalg.norm(designed[design][group[0]][1] @ memory.basis) <= 1e-4
    for name, (task_0, task_1) in designed["cov_proj"].items():
        assert torch.allclose(task_0.abs(), designed["sym"][name][0].abs(), atol=1e-5)
        assert not torch.allclose(task_1.abs(), designed["sym"][name][1].abs(), atol=1e-3)


def test_energy_gpm_thresholds_eigenvalues_and_code_their_squares():
    """Spectrum (4, 2, 1, 1), threshold 0.8: squared shares 16/22, 4/22, ... cross 0.8 after one direction
    (`code` keeps 1); plain shares 4/8, 2/8, ... after two (`gpm` keeps 2). In the method: gpm keeps more."""
    covariance = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    assert first_basis(covariance, 0.8, "code", dual=False).basis.shape[1] == 1
    assert first_basis(covariance, 0.8, "gpm", dual=False).basis.shape[1] == 2
    [code] = old_dims_over_tasks(1)
    [gpm] = old_dims_over_tasks(1, energy="gpm")
    assert all(small < large for small, large in zip(code, gpm))
