"""OA-Adapter invariants (specs/oa-adapter.md §9): the gated layer, the soft threshold, the penalty, the method."""

import pytest
import torch
from helpers import tiny_config, tiny_text_stream, train_method_task
from torch import nn

from loracl.adapters.gated import GatedLayer, orthogonality_loss, soft_threshold
from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig
from loracl.engine.loaders import SplitLoader
from loracl.errors import ConfigError
from loracl.methods.base import MethodContext
from loracl.methods.registry import create_method


def make_method(**options):
    """A tiny-bert classifier with oa_adapter attached, and a 3-task synthetic stream."""
    backbone = load_backbone("tiny-bert", max_length=32, seed=0)
    model = ContinualClassifier(backbone)
    context = MethodContext(HeadConfig(), TrainConfig(progress=False), seed=0, num_tasks=3)
    method = create_method("oa_adapter", options, context)
    method.attach(model)
    return method, model, tiny_text_stream(3, train=16, test=8)


def batches(model, task, train=True):
    return SplitLoader(task.train if train else task.test, model.backbone, 8, task.index, shuffle=train)


def train_task(method, model, task, steps=4, lr=5e-2):
    """begin_task, a few optimizer steps on task loss + penalty, end_task (what the engine does)."""
    # the split the shuffled loader reads is the training split; end_task sees the test split, as before
    train_method_task(method, task, lambda shuffle: batches(model, task, train=shuffle), steps, lr)


def linear_layer(d_in=6, d_out=5, dropout=0.0):
    torch.manual_seed(0)
    return GatedLayer(nn.Linear(d_in, d_out), "toy", dropout)


# ----- soft threshold ---------------------------------------------------------------------------------
def test_soft_threshold_values_and_gradients_on_a_toy_vector():
    gate = torch.tensor([0.5, -0.3, 0.05, -0.1, 0.1], requires_grad=True)
    tau = torch.tensor(0.1, requires_grad=True)
    gamma = soft_threshold(gate, tau)
    assert torch.allclose(gamma, torch.tensor([0.4, -0.2, 0.0, 0.0, 0.0]))
    assert gamma[2] == 0 and gamma[3] == 0 and gamma[4] == 0  # |g| <= τ is exactly 0 (|g| = τ inactive)
    for i in range(5):
        grad_gate, grad_tau = torch.autograd.grad(gamma[i], [gate, tau], retain_graph=True)
        active = abs(gate[i].item()) > tau.item()
        expected_gate = torch.zeros(5)
        expected_gate[i] = 1.0 if active else 0.0
        assert torch.equal(grad_gate, expected_gate)
        assert grad_tau.item() == (-torch.sign(gate[i]).item() if active else 0.0)


# ----- the layer --------------------------------------------------------------------------------------
def test_identity_at_init_exactly():
    layer = linear_layer()
    x = torch.randn(3, 6)
    reference = layer.base_layer(x)
    layer.add_branch("t0", 4)
    assert torch.equal(layer(x), reference)


def test_all_dimensions_active_at_step_zero_under_default_init():
    method, _, _ = make_method()
    method.begin_task(tiny_text_stream(1).tasks[0])
    for branch in method.current_branches().values():
        assert branch.r_eff() == method.options.rank


def test_branch_is_a_low_rank_update_and_inactive_dims_get_no_task_gradient():
    layer = linear_layer(8, 7)
    branch = layer.add_branch("t0", 5)
    with torch.no_grad():
        branch.up.normal_()
        branch.gate.copy_(torch.tensor([0.5, 0.0005, -0.4, -0.0002, 0.3]))  # dims 1 and 3 below τ = 1e-3
    x = torch.randn(4, 8)
    delta = layer(x) - layer.base_layer(x)
    expected = x @ ((branch.up * branch.gamma()) @ branch.down).T
    assert torch.allclose(delta, expected, atol=1e-6)
    assert torch.linalg.matrix_rank(branch.delta_weight()) <= branch.r_eff() == 3
    delta.pow(2).sum().backward()
    inactive = torch.tensor([1, 3])
    assert torch.all(branch.down.grad[inactive] == 0)
    assert torch.all(branch.up.grad[:, inactive] == 0)
    assert torch.all(branch.gate.grad[inactive] == 0)
    assert branch.up.grad[:, 0].abs().sum() > 0 and branch.threshold.grad != 0


def test_pruning_is_lossless_and_shrinks_the_branch():
    layer = linear_layer(8, 7)
    branch = layer.add_branch("t0", 5)
    with torch.no_grad():
        branch.up.normal_()
        branch.gate.copy_(torch.tensor([0.5, 0.0, -0.4, 0.0009, 0.3]))
    x = torch.randn(4, 8)
    before = layer(x)
    keep = branch.prune()
    assert keep.tolist() == [True, False, True, False, True]
    assert branch.down.shape == (3, 8) and branch.up.shape == (7, 3) and branch.rank == 3
    assert torch.allclose(layer(x), before, atol=1e-6)
    assert branch.parameter_count() == 3 * (8 + 7) + 3 + 1


def test_merge_equals_unmerged_sum_and_unmerge_restores_weight():
    layer = linear_layer(8, 7)
    original = layer.base_layer.weight.detach().clone()
    for name in ("t0", "t1"):
        branch = layer.add_branch(name, 3)
        with torch.no_grad():
            branch.up.normal_()
            branch.gate.uniform_(0.1, 1.0)
    layer.eval()
    x = torch.randn(5, 8)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    assert torch.allclose(layer(x), unmerged, atol=1e-6)


def test_gated_layer_refuses_conv2d():
    with pytest.raises(Exception, match="nn.Linear only"):
        GatedLayer(nn.Conv2d(2, 2, 1), "conv")


# ----- the orthogonality penalty ----------------------------------------------------------------------
def test_orthogonality_loss_matches_brute_force_over_blocks():
    torch.manual_seed(1)
    up = torch.randn(10, 4)
    blocks = [torch.randn(10, 2), torch.randn(10, 3)]
    brute = sum(torch.dot(up[:, i], block[:, j]) ** 2 for block in blocks for i in range(4) for j in range(block.shape[1]))
    assert torch.allclose(orthogonality_loss(up, torch.cat(blocks, dim=1)), brute, rtol=1e-5)
    assert orthogonality_loss(up, None) == 0


def test_orthogonality_loss_zero_on_the_orthogonal_complement_and_gradient_only_to_current():
    torch.manual_seed(2)
    history = torch.randn(10, 3)
    basis, _ = torch.linalg.qr(history)
    raw = torch.randn(10, 4)
    up = (raw - basis @ (basis.T @ raw)).requires_grad_(True)  # project out span(H)
    assert orthogonality_loss(up, history).item() < 1e-10
    current = torch.randn(10, 4, requires_grad=True)
    old = torch.randn(10, 3, requires_grad=True)
    orthogonality_loss(current, old.detach()).backward()
    assert current.grad is not None and current.grad.abs().sum() > 0 and old.grad is None


def test_penalty_is_zero_on_the_first_task_and_uses_detached_active_history():
    method, model, stream = make_method(orth_lambda=1.0)
    method.begin_task(stream.tasks[0])
    assert method.orthogonality_penalty() is None
    batch = next(iter(batches(model, stream.tasks[0])))
    assert method.extra_loss(batch, method.forward(batch)) is None
    with torch.no_grad():  # a trained-looking task 0 whose dimension 2 ends inactive
        for branch in method.current_branches().values():
            branch.up.normal_()
            branch.gate.uniform_(0.01, 0.5)
            branch.gate[2] = 0.0
    method.end_task(stream.tasks[0], [])
    method.begin_task(stream.tasks[1])
    site, layer = next(iter(method.layers.items()))
    current = layer.branches["task_1"]
    old = layer.branches["task_0"]
    history = method.history[site]
    assert history.shape[1] == old.r_eff() == method.options.rank - 1 and not history.requires_grad
    with torch.no_grad():
        current.up.normal_()
    penalty = method.orthogonality_penalty()
    brute = sum(
        torch.dot(current.up[:, i], old.up[:, j] * old.gamma()[j]) ** 2
        for i in range(current.rank)
        for j in range(old.rank)
        if old.gamma()[j] != 0
    )
    others = sum(
        orthogonality_loss(method.current_branches()[s].up, method.history[s]) for s in method.layers if s != site
    )
    assert brute > 0 and torch.allclose(penalty, brute + others, rtol=1e-4)
    penalty.backward()
    assert current.up.grad is not None and old.up.grad is None and old.gate.grad is None


def test_pruned_history_columns_do_not_change_the_penalty():
    method, _, stream = make_method()
    method.begin_task(stream.tasks[0])
    site, layer = next(iter(method.layers.items()))
    old = layer.branches["task_0"]
    with torch.no_grad():
        old.up.normal_()
        old.gate[1] = 0.0  # inactive under τ = 1e-3
    first = method._history(layer)
    with torch.no_grad():
        old.up[:, 1].normal_(mean=5.0)
    second = method._history(layer)
    assert first.shape[1] == method.options.rank - 1 and torch.equal(first, second)
    up = torch.randn(first.shape[0], 3)
    assert orthogonality_loss(up, first) == orthogonality_loss(up, second)


# ----- the method -------------------------------------------------------------------------------------
def test_old_branches_bit_identical_and_parameter_counts():
    method, model, stream = make_method(rank=4)
    r, dims = 4, method.site_dims()
    snapshots = {}
    for task in stream.tasks:
        train_task(method, model, task)
        trainable_now = sum(p.numel() for b in method.current_branches().values() for p in b.parameters())
        assert trainable_now == sum(r_eff * (a + b) + r_eff + 1 for (a, b), r_eff in zip(dims.values(), method.budgets[task.name].values()))
        for _earlier, tensors in snapshots.items():
            for key, value in tensors.items():
                assert torch.equal(model.state_dict()[key], value), f"{key} changed after task {task.name}"
        snapshots[task.name] = {
            key: value.clone() for key, value in model.state_dict().items() if f"branches.task_{task.index}." in key
        }
    expected_max = sum(r * (a + b) + r + 1 for a, b in dims.values())
    assert method.max_adapter_params() == expected_max
    assert method.task_metrics()["active_adapter_params_per_task"] == [
        method.stored_adapter_params(task.name) for task in stream.tasks
    ]


def test_trainable_parameters_in_a_task_match_the_formula():
    method, _, stream = make_method(rank=3)
    method.begin_task(stream.tasks[0])
    head_ids = {id(p) for p in method.model.head.parameters()}
    adapter = sum(p.numel() for p in method.trainable_parameters() if id(p) not in head_ids)
    assert adapter == sum(3 * (a + b) + 3 + 1 for a, b in method.site_dims().values())


def test_tau_scope_global_shares_one_threshold_and_fixed_budget_keeps_all_dims_open():
    method, _, stream = make_method(tau_scope="global")
    method.begin_task(stream.tasks[0])
    thresholds = {id(b.threshold) for b in method.current_branches().values()}
    assert len(thresholds) == 1
    fixed, _, _ = make_method(budget="fixed")
    fixed.begin_task(stream.tasks[0])
    for branch in fixed.current_branches().values():
        assert branch.threshold.item() == 0.0 and not branch.threshold.requires_grad and branch.gate.requires_grad


@pytest.mark.parametrize(
    "options, key",
    [
        ({"rank": 0}, "rank"),
        ({"dropout": 1.0}, "dropout"),
        ({"tau_init": -1e-3}, "tau_init"),
        ({"gate_init": 1e-4}, "gate_init"),
        ({"tau_scope": "block"}, "tau_scope"),
        ({"budget": "none"}, "budget"),
        ({"orth_lambda": -0.1}, "orth_lambda"),
        ({"orth_current": "some"}, "orth_current"),
        ({"down_init": "zeros"}, "down_init"),
        ({"scaling": 0.0}, "scaling"),
        ({"gate_lr_scale": 0.0}, "gate_lr_scale"),
        ({"inference": "route"}, "inference"),
        ({"alpha": 16}, "alpha"),
    ],
)
def test_bad_options_give_one_error_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config({"name": "oa_adapter", **options})


def test_a_fully_pruned_branch_is_empty_and_adds_nothing():
    layer = linear_layer(8, 7)
    branch = layer.add_branch("t0", 3)
    with torch.no_grad():
        branch.up.normal_()
        branch.gate.zero_()  # every dimension at or below τ
    branch.prune()
    x = torch.randn(2, 8)
    assert branch.rank == 0 and branch.reserved_columns().shape == (7, 0)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert orthogonality_loss(torch.randn(7, 3), branch.reserved_columns()) == 0


def test_revivals_count_each_inactive_to_active_flip_per_site_and_task():
    method, model, stream = make_method()
    task = stream.tasks[0]
    method.begin_task(task)
    sites = list(method.current_branches())
    first, other = method.current_branches()[sites[0]], method.current_branches()[sites[1]]
    with torch.no_grad():
        first.gate[:2] = 0.0  # two dimensions at or below τ: inactive
    method.after_step()
    with torch.no_grad():
        first.gate[:2] = 1.0  # both come back
        other.gate[0] = 0.0  # one goes inactive: not a revival
    method.after_step()
    method.after_step()  # no change: nothing counted twice
    method.end_task(task, batches(model, task, train=False))
    assert method.revivals[task.name][sites[0]] == 2
    assert sum(method.revivals[task.name].values()) == 2
    assert method.task_metrics()["revivals"] == {task.name: 2}


def test_classifier_output_unchanged_when_each_task_starts():
    """Spec 9.1 on the whole classifier: adding a task's gated adapters (W2 = 0) leaves the backbone's features
    and the existing classes' logits exactly as they were, at the first task and after a trained one."""
    method, model, stream = make_method()
    model.eval()
    inputs = model.backbone.collate(stream.tasks[0].test.inputs[:6])
    bare = model.features(inputs)
    method.begin_task(stream.tasks[0])
    model.eval()
    assert torch.equal(model.features(inputs), bare)
    method.end_task(stream.tasks[0], batches(model, stream.tasks[0], train=False))
    train_task(method, model, stream.tasks[1])
    model.eval()
    with torch.no_grad():
        features, logits = model.features(inputs), model.head(model.features(inputs))
        method.begin_task(stream.tasks[2])
        model.eval()
        after = model.features(inputs)
        assert torch.equal(after, features)
        assert torch.equal(model.head(after)[:, : logits.shape[1]], logits)
