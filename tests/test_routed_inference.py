"""The [D] routed-inference option (methods/routing.py): the router against a brute-force LDA, frozen routing
features, scores restricted to the routed task, the model as of the routed task, state round trip, the engine
end to end with resume, and option errors."""

import shutil

import pytest
import torch
from helpers import separable_stream as alphabet_stream
from helpers import tiny_config, tiny_text_stream, train_method_task
from pydantic import ValidationError

from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig
from loracl.engine import run_experiment
from loracl.engine.loaders import SplitLoader
from loracl.methods.base import MethodContext
from loracl.methods.cluster_router import ClusterRouter
from loracl.methods.mean_router import MeanRouter
from loracl.methods.registry import create_method
from loracl.methods.routing import Router, predict_by_route


def build(name: str, options: dict | None = None, scenario: str = "class_incremental"):
    model = ContinualClassifier(load_backbone("tiny-bert", max_length=16, seed=0))
    context = MethodContext(HeadConfig(), TrainConfig(), seed=0, scenario=scenario, num_tasks=3)
    method = create_method(name, {"routed_inference": True, **(options or {})}, context)
    method.attach(model)
    return method, model


def loader(method, split, task_index, shuffle=False):
    """Example keys unique per task and split, as the engine's are (the probe caches features by them)."""
    keys = {"split_name": f"split{id(split)}", "task_name": f"t{task_index}"}
    return SplitLoader(split, method.model.backbone, 4, task_index, shuffle=shuffle, **keys)


def train_task(method, task, steps: int = 2) -> None:
    train_method_task(method, task, lambda shuffle: loader(method, task.train, task.index, shuffle), steps)


def separable_stream(scenario: str = "class_incremental"):
    return alphabet_stream(scenario, seed=1)


def trained(name: str, options: dict | None = None, scenario: str = "class_incremental"):
    stream = separable_stream(scenario)
    method, model = build(name, options, scenario)
    for task in stream.tasks:
        train_task(method, task)
    model.eval()
    return method, model, stream


def test_router_routes_like_a_brute_force_shrunk_lda():
    generator = torch.Generator().manual_seed(0)
    router = MeanRouter(6, "mahalanobis", shrinkage=0.2)
    features, slots = [], []
    for task_index, classes in enumerate([[0, 1], [2, 3, 4]]):
        slot_of_class = router.add_task(task_index, classes)
        for class_id in classes:
            center = torch.randn(6, generator=generator) * 3
            batch = center + torch.randn(10, 6, generator=generator)
            router.accumulate(batch, torch.full((10,), slot_of_class[class_id]))
            features.append(torch.nn.functional.normalize(batch, dim=-1))
            slots.append(torch.full((10,), slot_of_class[class_id]))
    features, slots = torch.cat(features).double(), torch.cat(slots)
    means = torch.stack([features[slots == s].mean(0) for s in range(5)])
    centred = features - means[slots]
    covariance = centred.T @ centred / len(features)
    covariance = 0.8 * covariance + 0.2 * covariance.trace() / 6 * torch.eye(6, dtype=torch.float64)
    precision = torch.linalg.inv(covariance)
    queries = torch.randn(7, 6, generator=generator) * 3
    normalised = torch.nn.functional.normalize(queries, dim=-1).double()
    difference = normalised[:, None] - means[None]
    expected = -torch.einsum("bsd,de,bse->bs", difference, precision, difference)
    torch.testing.assert_close(router.slot_scores(queries).double(), expected, atol=1e-3, rtol=1e-4)
    slot_task = torch.tensor([0, 0, 1, 1, 1])
    assert torch.equal(router.route(queries), slot_task[expected.argmax(1)])
    assert router.task_classes(1) == [2, 3, 4] and router.task_classes(0) == [0, 1]
    router.metric = "cosine"  # the same statistics read by the cosine router
    expected_cosine = normalised @ torch.nn.functional.normalize(means, dim=-1).T
    assert torch.equal(router.route(queries), slot_task[expected_cosine.argmax(1)])


ROUTERS = {
    "task_router": lambda: MeanRouter(6),
    "cluster_router_full": lambda: ClusterRouter(6, clusters=2, ridge=1e-4, covariance="full", seed=0),
    "cluster_router_shared": lambda: ClusterRouter(6, clusters=2, ridge=1e-4, covariance="shared", seed=0),
}


@pytest.mark.parametrize("make", ROUTERS.values(), ids=ROUTERS.keys())
def test_every_router_keeps_the_slot_contract_and_routes_separated_tasks(make):
    """The Router contract for both implementations: one slot per (task, class) in recording order, each task's
    classes, and examples drawn around a task's class centres routed to that task (never to its neighbour)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[[0, 1, 3, 4]] * 4  # task 0: classes 0, 1; task 1: classes 2, 3
    router: Router = make()
    for task_index, class_ids in ((0, [0, 1]), (1, [2, 3])):
        labels = torch.tensor(class_ids).repeat_interleave(12)
        features = centres[labels] + 0.3 * torch.randn(len(labels), 6, generator=generator)
        router.record_task(task_index, class_ids, [(features[:10], labels[:10]), (features[10:], labels[10:])])
    assert router.slot_task.tolist() == [0, 0, 1, 1] and router.slot_class.tolist() == [0, 1, 2, 3]
    assert router.task_classes(1) == [2, 3]
    queries = centres[[3, 0, 2, 1]] + 0.3 * torch.randn(4, 6, generator=generator)
    assert router.route(queries).tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("make", ROUTERS.values(), ids=ROUTERS.keys())
def test_an_empty_router_refuses_to_route(make):
    with pytest.raises(RuntimeError, match="no statistics"):
        make().route(torch.zeros(2, 6))


def test_predict_by_route_serves_each_group_as_its_task_and_puts_rows_back_in_order():
    """Rows routed to tasks 2, 0, 2, 1: each group sees only its rows with task_ids set to its task (never the
    batch's own), and the answers land at their rows, narrower groups padded with the fill value."""
    batch = {"inputs": {"x": torch.arange(4.0)[:, None]}, "task_ids": torch.tensor([0, 0, 0, 0]), "labels": torch.zeros(4)}
    seen = []

    def as_task(task_index, rows, group):
        seen.append((task_index, rows.tolist(), group["task_ids"].tolist()))
        return group["inputs"]["x"].repeat(1, task_index + 1) * 10  # width grows with the task index

    out = predict_by_route(torch.tensor([2, 0, 2, 1]), batch, as_task, fill=-1.0)
    assert seen == [(0, [1], [0]), (1, [3], [1]), (2, [0, 2], [2, 2])]
    assert out.tolist() == [[0.0, 0.0, 0.0], [10.0, -1.0, -1.0], [20.0, 20.0, 20.0], [30.0, 30.0, -1.0]]


@pytest.mark.parametrize("name", ["inc_lora", "fm_lora"])
def test_routing_features_are_the_frozen_backbone_and_the_adapters_come_back(name):
    options = {"rank": 4, "prompt_len": 2} if name == "fm_lora" else {}
    method, model, stream = trained(name, options)
    batch = next(iter(loader(method, stream.tasks[1].test, 1)))
    fresh = ContinualClassifier(load_backbone("tiny-bert", max_length=16, seed=0)).eval()
    torch.testing.assert_close(method.routing_features(batch["inputs"]), fresh.features(batch["inputs"]))
    adapted = model.features(batch["inputs"])
    assert not torch.allclose(adapted, fresh.features(batch["inputs"]), atol=1e-4)  # the adapters were off, not gone
    torch.testing.assert_close(model.features(batch["inputs"]), adapted)


def test_embedding_router_features_read_the_embedding_layer():
    method, model, stream = trained("inc_lora", {"router_features": "embed"})
    batch = next(iter(loader(method, stream.tasks[0].test, 0)))
    expected = model.backbone.embedding_features(**batch["inputs"])
    torch.testing.assert_close(method.routing_features(batch["inputs"]), expected)


@pytest.mark.parametrize("name", ["o_lora", "inflora", "sd_lora", "oa_adapter", "seq_lora", "probe"])
def test_predict_scores_only_the_routed_task_without_reading_task_ids(name):
    method, _, stream = trained(name)
    for task in stream.tasks:
        batch = next(iter(loader(method, task.test, task.index)))
        scores = method.predict({"inputs": batch["inputs"]})  # no task ids, no labels
        routes = method.routing_tally.pending[-1]
        for row, route in enumerate(routes.tolist()):
            assert torch.isfinite(scores[row]).nonzero().squeeze(1).tolist() == stream.tasks[route].class_ids
        method.after_evaluate_task(task)
    metrics = method.task_metrics()
    assert set(metrics["routing_accuracy_per_task"]) == {"t0", "t1", "t2"}
    assert metrics["routing_accuracy"] >= 0.9  # disjoint alphabets


def test_routed_branches_serve_each_example_with_the_adapters_of_its_task():
    method, _, stream = trained("inc_lora")
    batch = next(iter(loader(method, stream.tasks[0].test, 0)))
    routed = method.predict({"inputs": batch["inputs"]})
    routes = method.routing_tally.pending[-1]
    assert routes.tolist() == [0] * len(routes)
    for layer in method.layers.values():  # by hand: only task 0's branch, only task 0's classes
        layer.disabled_branches = {"task_1", "task_2"}
    by_hand = method.score({"inputs": batch["inputs"]})[:, stream.tasks[0].class_ids]
    for layer in method.layers.values():
        layer.disabled_branches = set()
    torch.testing.assert_close(routed[:, stream.tasks[0].class_ids], by_hand)
    every_branch = method.score({"inputs": batch["inputs"]})[:, stream.tasks[0].class_ids]
    assert not torch.allclose(every_branch, by_hand, atol=1e-5)  # the later branches did change task 0's scores
    method.options.routed_branches = False
    torch.testing.assert_close(method.predict({"inputs": batch["inputs"]})[:, stream.tasks[0].class_ids], every_branch)
    assert all(not layer.disabled_branches for layer in method.layers.values())


def test_task_incremental_runs_serve_the_given_task():
    method, _, stream = trained("o_lora", scenario="task_incremental")
    batch = next(iter(loader(method, stream.tasks[0].test, 0)))
    batch["task_ids"] = torch.full_like(batch["task_ids"], 2)  # the router would say 0
    scores = method.predict(batch)
    assert all(torch.isfinite(row).nonzero().squeeze(1).tolist() == stream.tasks[2].class_ids for row in scores)
    assert method.task_metrics().get("routing_accuracy") is None


def test_router_state_round_trips_through_the_method_state():
    method, _, stream = trained("o_lora", {"router": "mahalanobis"})
    state = method.state_dict()
    assert {"task_router.slot_task", "task_router.scatter", "task_router.means.sums"} <= set(state)
    restored, _ = build("o_lora", {"router": "mahalanobis"})
    restored.restore_structure(stream.tasks)
    restored.load_state_dict(state)
    restored.model.eval()
    batch = next(iter(loader(method, stream.tasks[2].test, 2)))
    torch.testing.assert_close(restored.predict({"inputs": batch["inputs"]}), method.predict({"inputs": batch["inputs"]}))
    assert torch.equal(restored.router.slot_task, torch.tensor([0, 0, 1, 1, 2, 2]))


def test_router_means_are_stored_in_float32_and_older_float64_states_still_load():
    method, _, stream = trained("o_lora", {"router": "mahalanobis"})
    state = method.state_dict()
    assert state["task_router.means.sums"].dtype == torch.float32  # 4 bytes per feature per class and task
    older = {**state, "task_router.means.sums": state["task_router.means.sums"].double()}  # before 2026-11-23
    restored, _ = build("o_lora", {"router": "mahalanobis"})
    restored.restore_structure(stream.tasks)
    restored.load_state_dict(older)
    assert restored.router.means.sums.dtype == torch.float32
    torch.testing.assert_close(restored.router.means.sums, state["task_router.means.sums"])


def test_routing_is_off_by_default_and_adds_no_state():
    model = ContinualClassifier(load_backbone("tiny-bert", max_length=16, seed=0))
    method = create_method("o_lora", {}, MethodContext(HeadConfig(), TrainConfig(), seed=0))
    method.attach(model)
    assert method.router is None and not any(key.startswith("task_router") for key in method.state_dict())


def test_engine_run_with_routing_reports_routing_accuracy_and_resumes(tmp_path):
    stream = tiny_text_stream(3, train=16, test=8)
    config = tiny_config({"name": "inc_lora", "routed_inference": True, "router_features": "embed"})
    [first] = run_experiment(config, tmp_path / "a", stream=stream)
    metrics = first.results["method_metrics"]
    # the routing metric recounted outside the engine's tally: each test example's task as the final router
    # sends it from the frozen embedding features; equal test sizes, so the overall accuracy is the mean
    method, by_hand = first.method, {}
    for task in stream.tasks:
        inputs = method.model.collate(task.test, list(range(len(task.test))), task, False)
        routes = method.router.route(method.routing_features(inputs))
        by_hand[task.name] = int((routes == task.index).sum()) / len(task.test)
    assert metrics["routing_accuracy_per_task"] == pytest.approx(by_hand)
    assert metrics["routing_accuracy"] == pytest.approx(sum(by_hand.values()) / 3)
    shutil.rmtree(tmp_path / "a" / "inc_lora" / "checkpoints" / "task_2")
    [resumed] = run_experiment(config, tmp_path / "a", stream=stream)  # restores the router of tasks 0 and 1
    assert resumed.results["accuracy_matrix"] == first.results["accuracy_matrix"]
    assert resumed.results["method_metrics"]["routing_accuracy"] == metrics["routing_accuracy"]


@pytest.mark.parametrize(
    ("name", "options", "culprit"),
    [
        ("o_lora", {"router": "tied"}, "router"),
        ("inflora", {"router_features": "blocks"}, "router_features"),
        ("sd_lora", {"router_shrinkage": 1.5}, "router_shrinkage"),
        ("fm_lora", {"routed_branches": True}, "routed_branches"),  # one shared subspace: no per-task branches
        ("seq_lora", {"routed_branches": True}, "routed_branches"),  # one branch for every task
        ("joint", {"routed_inference": True}, "routed_inference"),  # one model for every task: nothing to route
    ],
)
def test_bad_routing_options_name_the_key(name, options, culprit):
    context = MethodContext(HeadConfig(), TrainConfig(), seed=0)
    with pytest.raises((ValidationError, ValueError), match=culprit):
        create_method(name, options, context)


def test_task_incremental_eval_of_an_untrained_task_gets_the_plain_scores_and_no_routing_entry():
    method, _, stream = trained("inc_lora", scenario="task_incremental")
    batch = next(iter(loader(method, stream.tasks[0].test, 0)))
    batch["task_ids"] = torch.full_like(batch["task_ids"], 5)  # a task the router has no classes for
    torch.testing.assert_close(method.predict(batch), method.score(batch))
    method.after_evaluate_task(stream.tasks[0])
    assert method.task_metrics() == {}  # task-incremental: no routing to score


def test_routes_of_a_task_not_trained_yet_are_not_scored_as_routing():
    stream = separable_stream()
    method, model = build("o_lora")
    for task in stream.tasks[:2]:
        train_task(method, task)
    model.eval()
    batch = next(iter(loader(method, stream.tasks[2].test, 2)))
    method.predict({"inputs": batch["inputs"]})  # routed to task 0 or 1: the only ones it knows
    method.after_evaluate_task(stream.tasks[2])
    assert "routing_accuracy" not in method.task_metrics() and not method.routing_tally.pending


def test_routing_keys_enter_the_run_fingerprint_only_when_routing_is_on():
    options_class = create_method("o_lora", {}, MethodContext(HeadConfig(), TrainConfig())).Options
    plain = options_class().fingerprint_dump()
    assert not any(key.startswith("rout") for key in plain)
    assert options_class(router="cosine").fingerprint_dump() == plain  # inert while routing is off
    routed = options_class(routed_inference=True).fingerprint_dump()
    assert routed["routed_inference"] is True and routed["router"] == "mahalanobis" and routed["routed_branches"] is True


def test_the_routed_probe_routes_from_its_feature_cache():
    method, model, stream = trained("probe")
    batch = next(iter(loader(method, stream.tasks[1].train, 1)))  # every example cached during training
    calls = []
    hook = model.backbone.model.register_forward_hook(lambda module, args, output: calls.append(1))
    scores = method.predict(batch)
    hook.remove()
    assert calls == [] and scores.shape[0] == len(batch["labels"])  # no backbone pass: route and scores cached
    fresh = method.routing_features(batch["inputs"])
    torch.testing.assert_close(method.batch_routing_features(batch), fresh)
