"""lorac_ipc invariants (spec §9): composition, ω snapshots, orthogonality, IPC, TII, merging, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_text_stream
from torch import nn

from loracl.adapters.orthogonal import TRAINING, ComposedLoraLayer
from loracl.engine.runner import MethodRun
from loracl.errors import ConfigError
from loracl.methods.cluster_router import mahalanobis_to_classes, precision_from_covariance, tii_precision
from loracl.methods.lorac_ipc import LoracIpc
from loracl.methods.routing import Router, RoutingTally

OPTIONS = {"name": "lorac_ipc", "rank": 4, "ipc_threshold": 0.25, "tap_epochs": 2, "tii_clusters": 2, "tap_centroids": 2}


def build(options: dict | None = None, num_tasks: int = 3):
    stream = tiny_text_stream(num_tasks, train=16, test=8)
    config = tiny_config({**OPTIONS, **(options or {})}, train={"epochs": 1, "lr": 2e-2})
    run = MethodRun(config, config.method[0], stream, None)
    method = run.build()
    method.attach(run.model)
    return run, method, stream


def train_loader(run, task):
    return run.loader(task.train, task, train=False)


def probe_inputs(run, stream):
    return next(iter(train_loader(run, stream.tasks[0])))["inputs"]


@torch.no_grad()
def features(run, method, inputs, model_index):
    method.set_model(model_index)
    out = run.model.features(inputs)
    method.set_model(TRAINING)
    return out


@torch.no_grad()
def infer_tasks(method, inputs):
    """TII alone: the router's task per example [B] from the routing model's features, and those features."""
    features = method.batch_routing_features({"inputs": inputs})
    return method.router.route(features), features


def learn(run, method, task):
    method.begin_task(task)
    run.train_task(method, task, 1, 2e-2, "test")
    method.end_task(task, train_loader(run, task))


@pytest.fixture(scope="module")
def trained():
    """Three tasks learned; records each model's features and factors right after its task."""
    run, method, stream = build()
    inputs = probe_inputs(run, stream)
    bare = run.model.features(inputs).detach()
    records = []
    for task in stream.tasks:
        learn(run, method, task)
        layer = next(iter(method.layers.values()))
        records.append(
            {
                "features": features(run, method, inputs, method.task_model[task.index]),
                "A": [a.detach().clone() for a in layer.factors_A],
                "B": [b.detach().clone() for b in layer.factors_B],
                "bank": {name: l.omega_bank.clone() for name, l in method.layers.items()},
                "frozen": {name for name, l in method.layers.items() if l.is_frozen},
            }
        )
    return run, method, stream, inputs, bare, records


# ----- composition and snapshots -------------------------------------------------------------------


def test_identity_at_start():
    run, method, stream = build()
    inputs = probe_inputs(run, stream)
    bare = run.model.features(inputs).detach()
    method.begin_task(stream.tasks[0])
    with torch.no_grad():
        assert torch.equal(run.model.features(inputs), bare)
    assert all(torch.equal(layer.training_delta(), torch.zeros_like(layer.weight)) for layer in method.layers.values())


def test_warm_start_of_each_task():
    run, method, stream = build()
    inputs = probe_inputs(run, stream)
    for task in stream.tasks[:2]:
        learn(run, method, task)
    previous = features(run, method, inputs, method.task_model[1])
    method.begin_task(stream.tasks[2])
    start = features(run, method, inputs, TRAINING)
    torch.testing.assert_close(start, previous, atol=1e-6, rtol=0)


def test_training_changes_the_model_and_earlier_models_stay_exact(trained):
    run, method, stream, inputs, bare, records = trained
    assert not torch.allclose(records[0]["features"], bare, atol=1e-4)  # task 1 did adapt the backbone
    layer = next(iter(method.layers.values()))
    for index, record in enumerate(records):
        now = features(run, method, inputs, method.task_model[index])
        torch.testing.assert_close(now, record["features"], atol=1e-6, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(record["A"], layer.factors_A))
        assert all(torch.equal(a, b) for a, b in zip(record["B"], layer.factors_B))


def test_omega_bank_rows_are_written_once(trained):
    _, method, _, _, _, records = trained
    for name, layer in method.layers.items():
        bank = layer.omega_bank
        for position in range(bank.shape[0]):
            if layer.is_frozen and position >= int(layer.frozen_from):
                continue
            assert bank[position, position].item() == 1.0  # ω_t is 1 exactly at the end of task t
        for position, record in enumerate(records):
            row = record["bank"][name][position]
            assert torch.equal(bank[position, : len(row)], row)


def test_old_factors_and_frozen_slots_get_no_gradient():
    run, method, stream = build({"ipc_threshold": 0.5})
    learn(run, method, stream.tasks[0])
    frozen = [layer for layer in method.layers.values() if layer.is_frozen]
    assert frozen
    expected = {id(layer): layer.inference_delta(1).clone() for layer in frozen}
    task = stream.tasks[1]
    method.begin_task(task)
    batch = next(iter(run.loader(task.train, task, train=True)))
    logits = method.forward(batch)
    (method.task_loss(logits, batch) + method.extra_loss(batch, logits)).backward()
    for layer in method.layers.values():
        assert layer.factors_A[0].grad is None and layer.factors_B[0].grad is None
        if layer.is_frozen:
            assert all(p.grad is None for p in (*layer.factors_A, *layer.factors_B, *layer.omega))
            assert torch.equal(layer.training_delta(), expected[id(layer)])
        else:
            assert layer.factors_B[1].grad is not None and layer.omega[0].grad is not None
            assert layer.omega[1].grad is None  # the current task's ω stays 1 while it trains
    run.train_task(method, task, 1, 2e-2, "test")
    method.end_task(task, train_loader(run, task))
    for layer in frozen:
        assert torch.equal(layer.inference_delta(2), expected[id(layer)])


def test_head_gradient_reaches_only_current_rows():
    run, method, stream = build()
    learn(run, method, stream.tasks[0])
    task = stream.tasks[1]
    method.begin_task(task)
    batch = next(iter(run.loader(task.train, task, train=True)))
    method.task_loss(method.forward(batch), batch).backward()
    head = run.model.head
    assert head.weights[0].grad is None and head.weights[1].grad is not None


# ----- orthogonality -------------------------------------------------------------------------------


def test_orthogonality_loss_brute_force_and_zero_when_orthonormal():
    run, method, stream = build()
    learn(run, method, stream.tasks[0])
    method.begin_task(stream.tasks[1])
    expected = 0.0
    for layer in method.free_layers().values():
        stacked = torch.cat([layer.factors_A[0], layer.factors_A[1]], dim=1).detach()
        expected += math.sqrt(sum((float(v) - (i == j)) ** 2 for i, row in enumerate(stacked.T @ stacked) for j, v in enumerate(row)))
    loss = method.orthogonality_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    for layer in method.free_layers().values():
        assert layer.factors_A[0].grad is None and layer.factors_A[1].grad is not None
    with torch.no_grad():
        for layer in method.layers.values():
            q = torch.linalg.qr(torch.randn(layer.fan_in, 2 * layer.rank)).Q
            layer.factors_A[0].copy_(q[:, : layer.rank])
            layer.factors_A[1].copy_(q[:, layer.rank :])
    assert method.orthogonality_loss().item() == pytest.approx(0.0, abs=1e-4)


# ----- IPC -----------------------------------------------------------------------------------------


def test_importance_formula_on_a_toy_linear():
    torch.manual_seed(0)
    layer = ComposedLoraLayer(nn.Linear(5, 3), "toy", rank=2, alpha=1.0)
    layer.add_pair()
    with torch.no_grad():
        layer.factors_B[0].normal_()
    layer.track_weight_gradient = True
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    logits = layer(x)
    weight = layer.base_layer.weight + layer.scaling * (layer.factors_A[0] @ layer.factors_B[0]).T
    torch.testing.assert_close(logits, x @ weight.T + layer.base_layer.bias)
    F.cross_entropy(logits, y).backward()
    by_hand = ((logits.softmax(-1) - F.one_hot(y, 3)) / 7).T @ x  # ∂CE/∂W for W of shape [d_out, d_in]
    torch.testing.assert_close(layer.weight_gradient, by_hand.detach())
    torch.testing.assert_close(layer.weight_value, weight.detach())


@pytest.mark.parametrize(
    "betas, steps, score",
    [
        # S1 = 0.15·1 = 0.15, U1 = 0.15·|1 - 0.15| = 0.1275; S2 = 0.85·0.15 + 0.15·3 = 0.5775, U2 = 0.85·0.1275 + 0.15·2.4225
        ({}, [(0.15, 0.1275), (0.5775, 0.47175)], 0.272435625),
        # S1 = 0.5, U1 = |1 - 0.5| = 0.5; S2 = 0.25 + 1.5 = 1.75, U2 = |3 - 1.75| = 1.25
        ({"ipc_beta1": 0.5, "ipc_beta2": 0.0}, [(0.5, 0.5), (1.75, 1.25)], 2.1875),
        # S1 = 0.8, U1 = 0.1·0.2 = 0.02; S2 = 0.16 + 2.4 = 2.56, U2 = 0.9·0.02 + 0.1·0.44 = 0.062
        ({"ipc_beta1": 0.2, "ipc_beta2": 0.9}, [(0.8, 0.02), (2.56, 0.062)], 0.15872),
    ],
)
def test_ema_update_order(betas, steps, score):
    """ipc_beta1 smooths the sensitivity, ipc_beta2 the uncertainty (distinct values: a swap would show). One slot
    gets W = 2 everywhere with dL/dW = 0.5, then -1.5: importances mean|W * dL/dW| = 1, then 3; the expected EMAs
    are worked out by hand. Slots that saw no gradient keep 0."""
    _, method, stream = build(betas)
    method.begin_task(stream.tasks[0])
    name, layer = next(iter(method.layers.items()))
    shape = layer.base_layer.weight.shape
    for gradient, (sensitivity, uncertainty) in zip([0.5, -1.5], steps):
        layer.weight_value = torch.full(shape, 2.0)
        layer.weight_gradient = torch.full(shape, gradient)
        method.after_backward()
        assert layer.weight_gradient is None  # consumed
        assert float(method.sensitivity[name]) == pytest.approx(sensitivity, rel=1e-5)
        assert float(method.uncertainty[name]) == pytest.approx(uncertainty, rel=1e-5)
    assert method.importance_scores()[name] == pytest.approx(score, rel=1e-5)
    assert all(method.importance_scores()[other] == 0.0 for other in method.layers if other != name)


def test_ipc_monotone_and_count(trained):
    _, method, _, _, _, records = trained
    slots = len(method.layers)
    k = math.floor(method.options.ipc_threshold * slots)
    previous: set[str] = set()
    for record in records:
        assert previous <= record["frozen"]
        assert len(record["frozen"] - previous) == k
        previous = record["frozen"]
    scores = method.importance_scores()
    assert all(scores[name] == 0.0 for name in previous)


def test_tau_zero_freezes_nothing():
    run, method, stream = build({"ipc_threshold": 0.0})
    learn(run, method, stream.tasks[0])
    assert not any(layer.is_frozen for layer in method.layers.values())
    assert not any(layer.track_weight_gradient for layer in method.layers.values())


def test_parameter_count_formula(trained):
    _, method, stream, _, _, _ = trained
    run2, fresh, _ = build()
    for task in stream.tasks[:2]:
        learn(run2, fresh, task)
    task = stream.tasks[2]
    fresh.begin_task(task)
    free = list(fresh.free_layers().values())
    head = (run2.model.head.hidden_size + 1) * len(task.class_ids)
    expected = sum(layer.pair_parameter_count() for layer in free) + 2 * len(free) + head
    assert sum(p.numel() for p in fresh.trainable_parameters()) == expected


# ----- inference -----------------------------------------------------------------------------------


def test_merge_equivalence_and_exact_unmerge(trained):
    run, method, _, inputs, _, records = trained
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in method.layers.items()}
    with torch.no_grad():
        method.set_model(method.task_model[1])
        reference = run.model(inputs)
        for layer in method.layers.values():
            layer.merge(method.task_model[1])
        merged = run.model(inputs)
        for layer in method.layers.values():
            layer.unmerge()
    method.set_model(TRAINING)
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=0)
    assert all(torch.equal(layer.base_layer.weight, originals[name]) for name, layer in method.layers.items())


def test_conv2d_slot_identity_and_merge():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    layer = ComposedLoraLayer(conv, "conv", rank=2)
    x = torch.randn(2, 3, 5, 5)
    expected = conv(x)
    layer.add_pair()
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    with torch.no_grad():
        layer.factors_B[0].normal_()
    layer.snapshot_omega(0)
    layer.model_index = 1
    adapted = layer(x)
    assert not torch.allclose(adapted, expected)
    layer.merge(1)
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)
    layer.unmerge()
    assert torch.equal(conv.weight, layer.base_layer.weight)


def test_tii_distance_zero_at_a_cluster_mean_and_routes_to_its_task(trained):
    run, method, stream, inputs, _, _ = trained
    router = method.router
    class_id = stream.tasks[1].class_ids[0]
    slot = method.router.slot_class.tolist().index(class_id)
    cluster = int(router.cluster_valid[slot].nonzero()[0])
    query = router.cluster_means[slot, cluster][None]
    distances = mahalanobis_to_classes(query, router.cluster_means, router.cluster_precisions, router.cluster_valid)
    assert distances[0, slot].item() == pytest.approx(0.0, abs=1e-5)
    assert router.slot_task[distances.argmin(dim=1)].item() == 1
    assert router.route(query).item() == 1  # the router's own answer, from a (normalised) feature at that mean


def test_tii_routes_each_example_to_the_task_of_its_nearest_cluster(trained):
    """TII on planted statistics: one valid cluster per chosen class, placed at an example's normalised
    routing-model features (identity precisions); each example goes to the task owning its cluster's class."""
    run, method, stream, inputs, _, _ = trained
    router = method.router
    probe = {key: value[:3] for key, value in inputs.items()}
    routing = F.normalize(features(run, method, probe, method.routing_model).float(), dim=-1)
    owners = [stream.tasks[2].class_ids[1], stream.tasks[0].class_ids[0], stream.tasks[1].class_ids[1]]
    slots = [router.slot_class.tolist().index(class_id) for class_id in owners]
    saved = {name: getattr(router, name).clone() for name in ("cluster_means", "cluster_precisions", "cluster_valid")}
    try:
        router.cluster_valid.zero_()
        router.cluster_precisions.copy_(torch.eye(routing.shape[1]).expand_as(router.cluster_precisions))
        for row, slot in zip(routing, slots):
            router.cluster_means[slot, 0] = row
            router.cluster_valid[slot, 0] = True
        tasks, _ = infer_tasks(method, probe)
    finally:
        for name, value in saved.items():
            getattr(router, name).copy_(value)
        method.set_model(TRAINING)
    assert tasks.tolist() == [2, 0, 1]


def test_mahalanobis_distances_on_a_hand_computed_case():
    """Two classes of two clusters in 2-D (class 1's second cluster invalid), queries (1, 1) and (0, 2):
    d_c = min_k (z - mu_ck)^T P_ck (z - mu_ck), worked out by hand for full, diagonal and shared precisions."""
    means = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    queries = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    coupled = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    full = torch.stack([torch.stack([torch.diag(torch.tensor([1.0, 4.0])), torch.eye(2)]), torch.stack([coupled, torch.eye(2)])])
    # (1,1): class 0 min(1 + 4, 0 + 1) = 1, class 1 (1,-1) P (1,-1) = 2; (0,2): class 0 min(16, 1 + 4) = 5, class 1 0
    torch.testing.assert_close(mahalanobis_to_classes(queries, means, full, valid), torch.tensor([[1.0, 2.0], [5.0, 0.0]]))
    diagonal = torch.tensor([[[1.0, 4.0], [1.0, 1.0]], [[2.0, 2.0], [1.0, 1.0]]])
    torch.testing.assert_close(mahalanobis_to_classes(queries, means, diagonal, valid), torch.tensor([[1.0, 4.0], [5.0, 0.0]]))
    # shared P = [[2, 1], [1, 2]]: (1,1): class 0 min(6, 2) = 2, class 1 2; (0,2): class 0 min(8, 6) = 6, class 1 0
    torch.testing.assert_close(mahalanobis_to_classes(queries, means, coupled, valid), torch.tensor([[2.0, 2.0], [6.0, 0.0]]))


@pytest.mark.parametrize(
    "ridge, full, expected",
    [
        (0.0, True, torch.tensor([[1.0, -0.3], [-0.3, 1.0]]) / 0.91),
        (2.0 / 3.0, True, torch.tensor([[1.0, -0.25], [-0.25, 1.0]]) * 16.0 / 15.0),
        (0.0, False, torch.tensor([3.0 / 20.0, 3.0 / 20.0])),
        (2.0 / 3.0, False, torch.tensor([1.0 / 8.0, 1.0 / 8.0])),
    ],
)
def test_tii_precision_on_a_hand_computed_case(ridge, full, expected):
    """Members (2,2), (-2,-2), (1,-1), (-1,1): covariance [[10/3, 2], [2, 10/3]]. + ridge I, + mean(diag) I:
    ridge 0 -> [[20/3, 2], [2, 20/3]], correlation 0.3; ridge 2/3 -> [[8, 2], [2, 8]], correlation 0.25.
    The inverse of [[1, c], [c, 1]] is [[1, -c], [-c, 1]] / (1 - c^2); diag keeps 1 / the shrunk variances."""
    members = torch.tensor([[2.0, 2.0], [-2.0, -2.0], [1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(tii_precision(members, ridge, full=full), expected, atol=1e-6, rtol=1e-6)


# ----- state and determinism -----------------------------------------------------------------------


def test_state_round_trip_and_determinism(trained):
    run, method, stream, inputs, _, _ = trained
    state = method.state_dict()
    for name, layer in method.layers.items():  # pairs of frozen slots after the freeze are not stored
        prefix = [key for key in state if key.endswith(f"{name}.frozen_from")][0][: -len("frozen_from")]
        if layer.is_frozen:
            assert f"{prefix}factors_A.{int(layer.frozen_from)}" not in state
    run2, again, _ = build()
    for task in stream.tasks:
        learn(run2, again, task)
    assert again.extra_state() == method.extra_state()  # same seed: same masks
    for name, layer in method.layers.items():
        assert torch.equal(layer.omega_bank, again.layers[name].omega_bank)
    run3, restored, _ = build()
    restored.restore_structure(stream.tasks)
    restored.load_state_dict(state)
    batch = {"inputs": inputs, "labels": torch.zeros(1), "task_ids": torch.zeros(len(inputs["input_ids"]), dtype=torch.long)}
    torch.testing.assert_close(restored.predict(batch), method.predict(batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "key, value",
    [
        ("rank", 0),
        ("alpha", 0.0),
        ("ortho_weight", -1.0),
        ("ortho_target", "R"),
        ("omega_lr_scale", 0.0),
        ("first_session_lr", -0.1),
        ("ipc_threshold", 1.5),
        ("ipc_beta1", 1.0),
        ("ipc_beta2", -0.1),
        ("ipc_importance", "grad"),
        ("ipc_score", "max"),
        ("ipc_count", "some"),
        ("ipc_selection", "random"),
        ("tii_clusters", 0),
        ("tii_ridge", -1.0),
        ("tii_cov", "tied"),
        ("tap_centroids", 0),
        ("tap_epochs", -1),
        ("tap_lr", 0.0),
        ("tap_momentum", 1.0),
        ("tap_batch_size", 0),
        ("tap_samples_per_cluster", 0),
        ("tap_iters_per_epoch", 0),
        ("tap_ridge", -1.0),
        ("tii", "yes"),
        ("no_such_knob", 1),
    ],
)
def test_bad_option_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_config({"name": "lorac_ipc", key: value})


def test_prototype_head_is_refused():
    stream = tiny_text_stream(2, train=8, test=4)
    config = tiny_config({"name": "lorac_ipc", "head": {"type": "prototype"}})
    run = MethodRun(config, config.method[0], stream, None)
    method = run.build()
    assert isinstance(method, LoracIpc)
    with pytest.raises(ConfigError, match="head.type"):
        method.attach(run.model)


def test_restrict_to_routed_task_scores_only_the_routed_tasks_classes(trained):
    """[D] option: with TII each row keeps only its inferred task's classes; off (the code's), every seen class."""
    run, method, stream, _, _, _ = trained
    batches = [next(iter(run.loader(task.test, task, train=False))) for task in stream.tasks]
    batch = {key: torch.cat([b[key] for b in batches]) for key in ("labels", "task_ids")}
    batch["inputs"] = {key: torch.cat([b["inputs"][key] for b in batches]) for key in batches[0]["inputs"]}
    options = method.options
    try:
        plain = method.predict(batch)
        tasks, _ = infer_tasks(method, batch["inputs"])
        method.options = options.model_copy(update={"restrict_to_routed_task": True})
        restricted = method.predict(batch)
    finally:
        method.options = options
    assert torch.isfinite(plain).all()
    for row, task_index in enumerate(tasks.tolist()):
        allowed = stream.tasks[task_index].class_ids
        assert torch.isfinite(restricted[row, allowed]).all()
        assert torch.isinf(restricted[row]).sum() == restricted.shape[1] - len(allowed)
        torch.testing.assert_close(restricted[row, allowed], plain[row, allowed])


def test_shared_tii_covariance_pools_every_cluster_and_routes_like_its_definition():
    """tii_cov shared: one [H, H] precision from the pooled within-cluster scatter; distances equal the formula."""
    run, method, stream = build({"tii_cov": "shared"})
    for task in stream.tasks:
        learn(run, method, task)
    router = method.router
    assert router.cluster_precisions.shape[2:] == (0,)  # nothing per cluster
    assert router.scatter_count.item() == sum(len(task.train) for task in stream.tasks)
    precision = router.shared_precision()
    assert router.shared_precision() is precision  # cached until the statistics change
    hidden = router.scatter.shape[0]
    pooled = router.scatter / (router.scatter_count - 1)
    torch.testing.assert_close(precision, precision_from_covariance(pooled, method.options.tii_ridge))
    assert precision.shape == (hidden, hidden) and torch.isfinite(precision).all()
    queries = torch.nn.functional.normalize(torch.randn(5, hidden, device=router.cluster_means.device), dim=-1)
    distances = mahalanobis_to_classes(queries, router.cluster_means, precision, router.cluster_valid)
    diff = queries[:, None, None] - router.cluster_means[None]
    brute = torch.einsum("bckh,hg,bckg->bck", diff, precision, diff).masked_fill(~router.cluster_valid[None], float("inf"))
    torch.testing.assert_close(distances, brute.min(-1).values, rtol=1e-4, atol=1e-4)
    tasks, _ = infer_tasks(method, probe_inputs(run, stream))
    assert set(tasks.tolist()) <= {task.index for task in stream.tasks}


# ----- switches: each option changes what it should -------------------------------------------------


def _finish_without_training(run, method, task):
    method.begin_task(task)
    method.end_task(task, train_loader(run, task))


@pytest.mark.parametrize(
    "options, per_slot", [({}, math.sqrt(292.0)), ({"ortho_squared": True}, 292.0), ({"ortho_target": "Q"}, 0.0)]
)
def test_orthogonality_target_and_square_on_hand_set_factors(options, per_slot):
    """A_1 = 2 [e_1..e_4], A_2 = 3 [e_5..e_8] in every slot: the stacked Gram minus I is diag(3 x4, 8 x4), so
    ||.||_F = sqrt(4*9 + 4*64) = sqrt(292) per slot (292 squared); their QR factors are orthonormal: 0."""
    run, method, stream = build({"ipc_threshold": 0.0, **options})
    _finish_without_training(run, method, stream.tasks[0])
    method.begin_task(stream.tasks[1])
    with torch.no_grad():
        for layer in method.layers.values():
            first, second = torch.zeros(layer.fan_in, 4), torch.zeros(layer.fan_in, 4)
            first[:4] = 2.0 * torch.eye(4)
            second[4:8] = 3.0 * torch.eye(4)
            layer.factors_A[0].copy_(first)
            layer.factors_A[1].copy_(second)
    assert len(method.free_layers()) == 12
    assert method.orthogonality_loss().item() == pytest.approx(12 * per_slot, rel=1e-6, abs=1e-4)


@pytest.mark.parametrize("options", [{}, {"omega_lr_scale": 3.0}, {"first_session_lr": 0.5}])
def test_omega_and_first_session_learning_rates(options):
    """first_session_lr sets the lr of the first adapted task only; omega_lr_scale multiplies the lr of the ω's."""
    run, method, stream = build({"ipc_threshold": 0.0, **options})
    method.begin_task(stream.tasks[0])
    assert [group["lr"] for group in method.parameter_groups(0.01, None)] == [options.get("first_session_lr", 0.01)] * 2
    method.end_task(stream.tasks[0], train_loader(run, stream.tasks[0]))
    method.begin_task(stream.tasks[1])
    groups = method.parameter_groups(0.01, None)
    omegas = {id(layer.omega[0]) for layer in method.layers.values()}
    assert [len(group["params"]) for group in groups] == [2 * 12, 12, 2]  # new pairs, old ω's, the new head rows
    assert {id(parameter) for parameter in groups[1]["params"]} == omegas
    assert [group["lr"] for group in groups] == pytest.approx([0.01, 0.01 * options.get("omega_lr_scale", 1.0), 0.01])


def test_lora_factor_importance_reads_the_current_pairs_gradients():
    """ipc_importance lora_factors: no effective-weight gradient is tracked; I = mean|A * dA| + mean|B * dB| of the
    current pair (with ipc_beta1 0 the sensitivity is this step's I). On task 1, the current pair has A = 0.5,
    dA = -2, B = 3, dB = 0.25 everywhere: I = 1 + 0.75 = 1.75; task 0's pair, given gradients of 10, must not count."""
    run, method, stream = build({"ipc_importance": "lora_factors", "ipc_beta1": 0.0})
    _finish_without_training(run, method, stream.tasks[0])
    method.begin_task(stream.tasks[1])
    assert not any(layer.track_weight_gradient for layer in method.layers.values())
    free = method.free_layers()
    assert len(free) == 9  # tau 0.25 froze 3 of the 12 slots after task 0
    with torch.no_grad():
        for layer in free.values():
            old_A, old_B, A, B = layer.factors_A[0], layer.factors_B[0], layer.factors_A[1], layer.factors_B[1]
            A.fill_(0.5)
            B.fill_(3.0)
            A.grad, B.grad = torch.full_like(A, -2.0), torch.full_like(B, 0.25)
            old_A.grad, old_B.grad = torch.full_like(old_A, 10.0), torch.full_like(old_B, 10.0)
    method.after_backward()
    assert all(layer.weight_gradient is None for layer in method.layers.values())
    assert {name: float(method.sensitivity[name]) for name in free} == pytest.approx(dict.fromkeys(free, 1.75), rel=1e-6)


@pytest.mark.parametrize("score", ["last_ema", "task_mean"])
def test_ipc_score_is_the_last_product_or_its_mean_over_the_task(score):
    run, method, stream = build({"ipc_score": score})
    task = stream.tasks[0]
    method.begin_task(task)
    products: dict[str, list[float]] = {name: [] for name in method.layers}
    for batch in run.loader(task.train, task, train=True):
        method.task_loss(method.forward(batch), batch).backward()
        method.after_backward()
        for name in method.layers:
            products[name].append(float(method.sensitivity[name] * method.uncertainty[name]))
    assert all(len(values) == 2 and values[0] != values[1] for values in products.values())
    pick = (lambda values: values[-1]) if score == "last_ema" else (lambda values: sum(values) / len(values))
    assert method.importance_scores() == pytest.approx({name: pick(values) for name, values in products.items()}, rel=1e-5)


def _set_scores(method, values):
    for name, value in zip(method.layers, values):
        method.sensitivity[name] = torch.tensor(float(value))
        method.uncertainty[name] = torch.tensor(1.0)


@pytest.mark.parametrize("selection, frozen", [("top_k", [0, 1, 2]), ("threshold", [0, 1, 2, 3, 4])])
def test_ipc_selection_top_k_or_every_slot_at_the_threshold(selection, frozen):
    """Scores 5, 3, 3, 3, 3, 1, 0 ... over 12 slots, tau 0.25 -> k = 3: top_k freezes 3 (ties in model order), the
    code's threshold rule every slot scoring at least the 3rd largest (3): 5 slots."""
    run, method, stream = build({"ipc_selection": selection})
    method.begin_task(stream.tasks[0])
    _set_scores(method, [5, 3, 3, 3, 3, 1, 0, 0, 0, 0, 0, 0])
    names = list(method.layers)
    assert method.select_frozen_slots(1) == [names[i] for i in frozen]
    assert [i for i, layer in enumerate(method.layers.values()) if layer.is_frozen] == frozen


@pytest.mark.parametrize("count, second_round", [("all", [3, 4, 5]), ("free", [3, 4])])
def test_ipc_count_over_all_slots_or_the_free_ones(count, second_round):
    """12 slots, tau 0.25: round one freezes floor(0.25 * 12) = 3 either way; round two freezes 3 more (all) or
    floor(0.25 * 9) = 2 (free)."""
    run, method, stream = build({"ipc_count": count})
    method.begin_task(stream.tasks[0])
    names = list(method.layers)
    _set_scores(method, range(12, 0, -1))
    assert method.select_frozen_slots(1) == names[:3]
    _set_scores(method, range(12, 0, -1))
    assert method.select_frozen_slots(2) == [names[i] for i in second_round]


def _routing_members(run, method, task):
    """Each class of a finished task: its normalised training features under the routing model."""
    feats, labels = method._features(train_loader(run, task), method.routing_model)
    return {class_id: F.normalize(feats[labels == class_id], dim=-1) for class_id in task.class_ids}


@pytest.mark.parametrize("clusters", [1, 3])
def test_tii_clusters_per_class(clusters):
    """tii_clusters K: K cluster slots per class, all filled (8 members each); with K = 1 the one mean is the class
    mean of the normalised routing features."""
    run, method, stream = build({"tii_clusters": clusters, "head_realign": False})
    task = stream.tasks[0]
    _finish_without_training(run, method, task)
    router = method.router
    assert tuple(router.cluster_means.shape) == (2, clusters, 32) and router.cluster_valid.sum(1).tolist() == [clusters] * 2
    assert router.slot_class.tolist() == task.class_ids and router.slot_task.tolist() == [task.index] * 2
    if clusters == 1:
        for slot, members in enumerate(_routing_members(run, method, task).values()):
            torch.testing.assert_close(router.cluster_means[slot, 0], members.mean(0))


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_tii_covariance_form_and_ridge(cov):
    """tii_cov full stores a [H, H] precision per cluster, diag [H]; both are tii_precision of the cluster's members
    (one cluster: the class) with the configured tii_ridge."""
    run, method, stream = build({"tii_cov": cov, "tii_clusters": 1, "tii_ridge": 0.5, "head_realign": False})
    task = stream.tasks[0]
    _finish_without_training(run, method, task)
    precisions = method.router.cluster_precisions
    assert tuple(precisions.shape[2:]) == ((32, 32) if cov == "full" else (32,))
    for slot, members in enumerate(_routing_members(run, method, task).values()):
        expected = tii_precision(members, 0.5, full=cov == "full")
        torch.testing.assert_close(precisions[slot, 0], expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected, tii_precision(members, 1e-4, full=cov == "full"), atol=1e-3)  # the ridge counts


@pytest.mark.parametrize("options, realigned", [({}, True), ({"head_realign": False}, False), ({"tap_epochs": 0}, False)])
def test_head_realign_and_tap_epochs_decide_whether_old_head_rows_move(options, realigned):
    """TAP runs after every task but the first: the old task's head rows change at the end of task 2 only with
    head_realign on and tap_epochs > 0; head_realign off stores no TAP Gaussians at all."""
    run, method, stream = build({"tap_epochs": 1, **options})
    learn(run, method, stream.tasks[0])
    task = stream.tasks[1]
    method.begin_task(task)
    run.train_task(method, task, 1, 2e-2, "test")
    head = run.model.head
    before = head.weights[0].detach().clone()
    method.end_task(task, train_loader(run, task))
    assert (not torch.equal(head.weights[0], before)) == realigned
    assert method.class_gaussians.means.shape[0] == (0 if options.get("head_realign") is False else 4)


@pytest.mark.parametrize("iterations", [None, 3])
def test_tap_knobs_reach_the_realignment_and_shape_the_gaussians(monkeypatch, iterations):
    """tap_lr, tap_momentum, tap_batch_size, tap_samples_per_cluster, tap_epochs and tap_iters_per_epoch (None:
    one batch per old class, 2 here) are what TAP runs with; tap_centroids sets the Gaussians per class and
    tap_ridge is added to each Gaussian's variance (one centroid: the class's population variance)."""
    import loracl.methods.lorac_ipc as lorac_module

    calls = []
    monkeypatch.setattr(lorac_module, "realign_head", lambda head, gaussians, **knobs: calls.append(knobs))
    options = {
        "tap_epochs": 3, "tap_lr": 0.2, "tap_momentum": 0.5, "tap_batch_size": 7, "tap_samples_per_cluster": 5,
        "tap_iters_per_epoch": iterations, "tap_centroids": 1, "tap_ridge": 0.25,
    }
    run, method, stream = build(options)
    _finish_without_training(run, method, stream.tasks[0])
    assert calls == []  # no TAP after the first task
    _finish_without_training(run, method, stream.tasks[1])
    [knobs] = calls
    expected = {"epochs": 3, "lr": 0.2, "momentum": 0.5, "batch_size": 7, "samples_per_cluster": 5, "iterations_per_epoch": iterations or 2}
    assert {key: knobs[key] for key in expected} == expected
    tap = method.class_gaussians
    assert tuple(tap.means.shape) == (4, 1, 32)
    task = stream.tasks[1]
    feats, labels = method._features(train_loader(run, task), method.task_model[task.index])
    for class_id in task.class_ids:
        members = feats[labels == class_id]
        torch.testing.assert_close(tap.stds[class_id, 0] ** 2, members.var(dim=0, correction=0) + 0.25, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("measure", [True, False])
def test_measure_without_tii_scores_the_newest_model_only_when_on(trained, measure):
    run, method, stream, _, _, _ = trained
    saved = (method.options, method.routing_tally, method.newest_counts, method.newest_rows)
    method.options = method.options.model_copy(update={"measure_without_tii": measure})
    method.routing_tally, method.newest_counts, method.newest_rows = RoutingTally(), {}, []
    try:
        for task in stream.tasks:
            method.predict(next(iter(run.loader(task.test, task, train=False))))
            method.after_evaluate_task(task)
        counted = dict(method.newest_counts)
        metrics = method.task_metrics()
    finally:
        method.options, method.routing_tally, method.newest_counts, method.newest_rows = saved
    if measure:
        assert sorted(counted) == [0, 1, 2] and "without_tii_accuracy_matrix" in metrics
    else:
        assert counted == {} and "without_tii_accuracy_matrix" not in metrics
    assert metrics["tii_accuracy"] is not None  # TII itself is measured either way


def test_task_incremental_runs_serve_the_given_task_and_measure_no_task_identity_inference():
    """The protocol gives the task: no clusters are kept (a slot-only router), each example is scored by its given
    task's composed model, and no TII accuracy is reported."""
    stream = tiny_text_stream(3, scenario="task_incremental", train=16, test=8)
    config = tiny_config({**OPTIONS}, train={"epochs": 1, "lr": 2e-2})
    run = MethodRun(config, config.method[0], stream, None)
    method = run.build()
    method.attach(run.model)
    for task in stream.tasks:
        learn(run, method, task)
    assert type(method.router) is Router and not any("cluster" in key for key in method.state_dict())
    batch = next(iter(run.loader(stream.tasks[0].test, stream.tasks[0], train=False)))
    logits = method.predict(batch)
    method.after_evaluate_task(stream.tasks[0])
    own = features(run, method, batch["inputs"], method.task_model[0])
    torch.testing.assert_close(logits, run.model.head(own).float())
    metrics = method.task_metrics()
    assert metrics["tii_accuracy"] is None and metrics["tii_accuracy_per_round"] == []


def test_a_checkpoint_in_the_layout_before_the_router_refactor_still_loads(trained):
    """State written before 2026-12-02 kept TAP and TII under `lorac_ipc_memory.`, TII rows by class id: it loads
    into today's method and predicts the same."""
    run, method, stream, inputs, _, _ = trained
    renames = {"lorac_ipc_class_gaussians.": "lorac_ipc_memory.tap.", "task_router.cluster_means": "lorac_ipc_memory.tii_means",
               "task_router.cluster_precisions": "lorac_ipc_memory.tii_precisions", "task_router.cluster_valid": "lorac_ipc_memory.tii_valid",
               "task_router.scatter_count": "lorac_ipc_memory.tii_scatter_count", "task_router.scatter": "lorac_ipc_memory.tii_scatter"}
    legacy = {}
    for key, value in method.state_dict().items():
        if key in ("task_router.slot_task", "task_router.slot_class"):
            continue  # the old layout had no slots
        new = next((prefix for prefix in renames if key.startswith(prefix)), None)
        legacy[key if new is None else renames[new] + key[len(new):]] = value
    assert any(key.startswith("lorac_ipc_memory.tii_means") for key in legacy)
    _, restored, _ = build()
    restored.restore_structure(stream.tasks)
    restored.load_state_dict(legacy)
    batch = {"inputs": inputs, "labels": torch.zeros(1), "task_ids": torch.zeros(len(inputs["input_ids"]), dtype=torch.long)}
    torch.testing.assert_close(restored.predict(batch), method.predict(batch), atol=1e-6, rtol=0)
    assert torch.equal(restored.router.slot_task, method.router.slot_task)
