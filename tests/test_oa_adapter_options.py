"""OA-Adapter options: each option, set away from its default, changes what it should (hand-set inputs, literal expectations)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import attached, seeded, text_batch

from loracl.adapters.gated import orthogonality_loss
from loracl.data.stream import Task
from loracl.methods.oa_adapter import OaAdapter


def oa_after_first_task(first: Task, second: Task, old_scale: float = 1.0, **options: object) -> OaAdapter:
    """oa_adapter with a trained-looking task 0 (hand-set up-projections, every gate open), finished, and task 1
    begun with hand-set up-projections; the same tensors whatever the options."""
    method: OaAdapter = attached("oa_adapter", **options)
    method.begin_task(first)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.copy_(seeded(*branch.up.shape, seed=index, scale=old_scale))
            branch.gate.fill_(0.5)
    method.end_task(first, [])
    method.begin_task(second)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.copy_(seeded(*branch.up.shape, seed=100 + index))
    return method


def oa_two_finished_tasks(first: Task, second: Task, **options: object) -> OaAdapter:
    """Two finished tasks whose branches both change the features (hand-set, no training), model in eval mode."""
    method: OaAdapter = attached("oa_adapter", **options)
    for index, task in enumerate((first, second)):
        method.begin_task(task)
        with torch.no_grad():
            for site_index, branch in enumerate(method.current_branches().values()):
                branch.up.copy_(seeded(*branch.up.shape, seed=10 * index + site_index, scale=3.0))
                branch.gate.fill_(1.0)
        method.end_task(task, [])
    method.model.eval()
    return method


@torch.no_grad()
def scores_with_branches_off(method: OaAdapter, batch: dict[str, object], names: set[str]) -> torch.Tensor:
    """The classifier's scores with the named branches switched off in every layer (outside the method)."""
    for layer in method.layers.values():
        layer.disabled_branches = set(names)
    try:
        return method.model.predict(batch)
    finally:
        for layer in method.layers.values():
            layer.disabled_branches = set()


@pytest.mark.parametrize("orth_lambda", [0.25, 2.0])
def test_oa_orth_lambda_weights_the_penalty_on_the_second_task(orth_lambda, first, second):
    method = oa_after_first_task(first, second, orth_lambda=orth_lambda)
    unweighted = sum(
        orthogonality_loss(branch.up, method.history[site]) for site, branch in method.current_branches().items()
    )
    assert unweighted > 1.0
    extra = method.extra_loss(None, None)
    assert extra is not None and torch.allclose(extra, orth_lambda * unweighted, rtol=1e-5)


def test_oa_orth_lambda_zero_adds_no_loss(first, second):
    method = oa_after_first_task(first, second, orth_lambda=0.0)
    assert method.orthogonality_penalty() > 0 and method.extra_loss(None, None) is None


@pytest.mark.parametrize("train_threshold", [True, False])
def test_oa_train_threshold_decides_whether_tau_trains(train_threshold, first):
    method = attached("oa_adapter", train_threshold=train_threshold)
    method.begin_task(first)
    trainable = {id(parameter) for parameter in method.trainable_parameters()}
    for branch in method.current_branches().values():
        assert branch.threshold.requires_grad is train_threshold
        assert (id(branch.threshold) in trainable) is train_threshold
        assert branch.gate.requires_grad and id(branch.gate) in trainable


@pytest.mark.parametrize("orth_current, zero_penalty", [("all", False), ("active_scaled", True)])
def test_oa_orth_current_active_scaled_ignores_a_closed_gate_column(orth_current, zero_penalty, first, second):
    """Only column 0 of the new up-projection is non-zero and its gate is closed: `all` still counts it, the
    gate-scaled columns are all zero."""
    method = oa_after_first_task(first, second, orth_current=orth_current)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.zero_()
            branch.up[:, 0] = seeded(branch.up.shape[0], seed=200 + index)
            branch.gate[0] = 0.0  # |g| <= tau: inactive
    penalty = method.orthogonality_penalty()
    assert (penalty.item() == 0.0) is zero_penalty
    if not zero_penalty:
        assert penalty.item() > 1e-3


@pytest.mark.parametrize("normalize, expected_ratio", [(True, 1.0), (False, 9.0)])
def test_oa_orth_normalize_makes_the_penalty_blind_to_the_old_columns_scale(normalize, expected_ratio, first, second):
    plain = oa_after_first_task(first, second, orth_normalize=normalize).orthogonality_penalty()
    tripled = oa_after_first_task(first, second, old_scale=3.0, orth_normalize=normalize).orthogonality_penalty()
    assert plain > 0 and (tripled / plain).item() == pytest.approx(expected_ratio, rel=1e-4)


@pytest.mark.parametrize("inference", ["sum", "task_oracle"])
def test_oa_inference_task_oracle_serves_only_the_tasks_own_branch(inference, first, second):
    method = oa_two_finished_tasks(first, second, inference=inference)
    batch = text_batch(method, first)
    summed = scores_with_branches_off(method, batch, set())
    own_only = scores_with_branches_off(method, batch, {"task_1"})
    assert not torch.allclose(summed, own_only, atol=1e-4)
    expected = own_only if inference == "task_oracle" else summed
    assert torch.allclose(method.predict(batch), expected, atol=1e-6)


@pytest.mark.parametrize("scope, distinct", [("site", 4), ("layer", 2), ("global", 1)])
def test_oa_tau_scope_shares_one_threshold_per_block(scope, distinct, first):
    method = attached("oa_adapter", tau_scope=scope)
    method.begin_task(first)
    branches = method.current_branches()
    assert len(branches) == 4 and len({id(branch.threshold) for branch in branches.values()}) == distinct
    if scope == "layer":  # query and value of one block share theirs, the two blocks do not
        for block in ("encoder.layer.0", "encoder.layer.1"):
            assert len({id(branch.threshold) for site, branch in branches.items() if block in site}) == 1


@pytest.mark.parametrize("clamp", [True, False])
def test_oa_clamp_threshold_clamps_a_negative_tau_after_a_step(clamp, first):
    method = attached("oa_adapter", clamp_threshold=clamp)
    method.begin_task(first)
    with torch.no_grad():
        for branch in method.current_branches().values():
            branch.threshold.fill_(-0.02)
    method.after_step()
    for branch in method.current_branches().values():
        assert branch.threshold.item() == pytest.approx(0.0 if clamp else -0.02)


@pytest.mark.parametrize("scaling", [0.5, 2.5])
def test_oa_scaling_multiplies_the_branch_output(scaling, first):
    """Same weights and input: the branch at `scaling` gives `scaling` times what it gives at scaling 1.0."""
    outputs = {}
    x = seeded(2, 32, seed=4)
    for value in (1.0, scaling):
        method = attached("oa_adapter", scaling=value)
        method.begin_task(first)
        branch = next(iter(method.current_branches().values()))
        with torch.no_grad():
            branch.down.copy_(seeded(*branch.down.shape, seed=2))
            branch.up.copy_(seeded(*branch.up.shape, seed=3))
            branch.gate.fill_(0.5)
            outputs[value] = branch(x)
    assert outputs[1.0].abs().max() > 0.1
    assert not torch.allclose(outputs[scaling], outputs[1.0], atol=1e-3)
    assert torch.allclose(outputs[scaling], scaling * outputs[1.0], atol=1e-6)


def test_oa_gate_and_tau_init_set_the_starting_values(first):
    method = attached("oa_adapter", gate_init=-0.3, tau_init=0.05)
    method.begin_task(first)
    for branch in method.current_branches().values():
        assert torch.equal(branch.gate, torch.full_like(branch.gate, -0.3))
        assert branch.threshold.item() == pytest.approx(0.05)
        assert torch.allclose(branch.gamma(), torch.full_like(branch.gate, -0.25))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_oa_down_init_gaussian_draws_w1_with_std_one_over_r(init, first):
    """Rank 2: N(0, 1/r^2) has std 0.5; Kaiming-uniform on fan-in 32 stays within 1/sqrt(32) ~ 0.18."""
    method = attached("oa_adapter", rank=2, down_init=init)
    method.begin_task(first)
    values = torch.cat([branch.down.detach().flatten() for branch in method.current_branches().values()])
    assert values.numel() == 4 * 2 * 32
    if init == "gaussian":
        assert values.std().item() == pytest.approx(0.5, rel=0.15) and values.abs().max() > 2 / math.sqrt(32)
    else:
        assert values.abs().max() <= 1 / math.sqrt(32)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_oa_gate_lr_scale_puts_gates_and_thresholds_in_their_own_group(scale, first):
    method = attached("oa_adapter", gate_lr_scale=scale)
    method.begin_task(first)
    groups = method.parameter_groups(0.1, None)
    gate_ids = {id(p) for branch in method.current_branches().values() for p in (branch.gate, branch.threshold)}
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert gate_ids <= set(lr_of)
    assert [lr_of[i] for i in gate_ids] == pytest.approx([0.1 * scale] * len(gate_ids))
    up_ids = {id(branch.up) for branch in method.current_branches().values()}
    assert [lr_of[i] for i in up_ids] == pytest.approx([0.1] * len(up_ids))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_oa_dropout_makes_training_forwards_stochastic(dropout, first):
    method = attached("oa_adapter", dropout=dropout)
    method.begin_task(first)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.copy_(seeded(*branch.up.shape, seed=index, scale=3.0))
    inputs = text_batch(method, first)["inputs"]
    method.model.train_adapters()
    torch.manual_seed(0)
    first_features, second_features = method.model.features(inputs), method.model.features(inputs)
    assert torch.equal(first_features, second_features) is (dropout == 0.0)
    method.model.eval()
    assert torch.equal(method.model.features(inputs), method.model.features(inputs))
