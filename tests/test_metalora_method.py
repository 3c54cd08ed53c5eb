"""Method-level invariants of metalora on tiny-bert (spec metalora.md section 9): identity at each new task,
block and trainable counts, frozen past, routing, seed layout, save/load, the CL modes and option errors."""

import pytest
import torch
from helpers import separable_stream, tiny_config, train_method_task

from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig
from loracl.engine.loaders import SplitLoader
from loracl.errors import ConfigError
from loracl.methods.base import MethodContext
from loracl.methods.registry import create_method


def build(options=None, scenario="class_incremental", head="linear"):
    backbone = load_backbone("tiny-bert", max_length=16, seed=0)
    model = ContinualClassifier(backbone)
    context = MethodContext(HeadConfig(type=head), TrainConfig(), seed=0, scenario=scenario, num_tasks=3)
    method = create_method("metalora", {"mapping_width": 8, **(options or {})}, context)
    method.attach(model)
    return method, model


def loader(method, split, task_index, shuffle=False):
    return SplitLoader(split, method.model.backbone, 4, task_index, shuffle=shuffle)


def train_task(method, task, steps=2):
    train_method_task(method, task, lambda shuffle: loader(method, task.train, task.index, shuffle), steps)


def routing_accuracy(method, stream):
    """Share of training examples routed to their own task from the extractor's features."""
    correct = total = 0
    for task in stream.tasks:
        for train_batch in loader(method, task.train, task.index):
            routes = method.router.route(method.frozen_features(train_batch["inputs"]))
            correct += int((routes == task.index).sum())
            total += len(routes)
    return correct / total


def probe_batch(method, stream):
    return next(iter(loader(method, stream.tasks[0].test, 0)))


def test_identity_at_every_new_task_and_trainable_count():
    stream = separable_stream()
    method, model = build()
    batch = probe_batch(method, stream)
    base = method.frozen_features(batch["inputs"])
    for task in stream.tasks:
        method.begin_task(task)
        block = method.block_of_task[task.index]
        assert torch.equal(method.adapted_features(batch["inputs"], block), base)
        trainable = sum(p.numel() for p in method.trainable_parameters())
        head_rows = len(task.class_ids) * (32 + 1)
        assert trainable == method.block_parameter_count(block) + head_rows
        method.end_task(task, loader(method, task.train, task.index))
    # 4 slots (q, v of 2 layers, 32 -> 32), CP R = 8, mapping 32 -> 8 -> 4 * 8
    assert method.block_parameter_count("task_0") == 4 * (8 * 64 + 8) + (2 * 32 + 32 * 8 + 8 + 8 * 32 + 32)


def test_seed_layout_is_module_order():
    for options, per_slot in [({}, 8), ({"decomposition": "tr"}, 9), ({"decomposition": "tr", "tr_seed": "diag"}, 3)]:
        method, _ = build(options)
        names = list(method.layers)
        assert names == sorted(names, key=lambda name: (int(name.split(".")[2]), name.endswith("value")))
        assert all(name.endswith(("query", "value")) for name in names) and len(names) == 4
        assert method.seed_sizes() == [per_slot] * 4
        task = separable_stream().tasks[0]
        method.begin_task(task)
        assert method.state.mapping["task_0"].out.out_features == 4 * per_slot


def test_frozen_past_is_bit_identical_and_routing_is_right():
    stream = separable_stream()
    method, model = build()
    batch = probe_batch(method, stream)
    base = method.frozen_features(batch["inputs"])
    train_task(method, stream.tasks[0])
    route_0 = method.adapted_features(batch["inputs"], "task_0")
    assert not torch.equal(route_0, base)  # the block learned something
    block_0 = {key: value.clone() for key, value in method.state_dict().items() if "task_0" in key}
    for task in stream.tasks[1:]:
        train_task(method, task)
    assert torch.equal(method.adapted_features(batch["inputs"], "task_0"), route_0)
    assert all(torch.equal(value, method.state_dict()[key]) for key, value in block_0.items())
    assert torch.equal(method.frozen_features(batch["inputs"]), base)
    # routing the training samples of well separated tasks
    assert routing_accuracy(method, stream) >= 0.99


def test_class_incremental_predict_never_reads_task_ids_and_scores_routing():
    stream = separable_stream()
    method, _ = build()
    for task in stream.tasks:
        train_task(method, task, steps=1)
    for task in stream.tasks:
        batch = next(iter(loader(method, task.test, task.index)))
        without_ids = {"inputs": batch["inputs"], "labels": batch["labels"]}
        scores = method.predict(without_ids)
        routed = method.routing_tally.pending[-1]
        allowed = torch.isfinite(scores)
        for row, route in enumerate(routed.tolist()):  # only the routed task's classes can win
            assert allowed[row].nonzero().squeeze(1).tolist() == stream.tasks[route].class_ids
        method.after_evaluate_task(task)
    metrics = method.task_metrics()
    assert metrics["routing_accuracy"] >= 0.99 and set(metrics["routing_accuracy_per_task"]) == {"t0", "t1", "t2"}


def test_task_incremental_uses_given_task_id():
    stream = separable_stream("task_incremental")
    method, _ = build(scenario="task_incremental")
    for task in stream.tasks:
        train_task(method, task, steps=1)
    batch = next(iter(loader(method, stream.tasks[0].test, 0)))
    batch["task_ids"] = torch.full_like(batch["task_ids"], 2)  # the router would say 0
    method.predict(batch)
    assert method.routing_tally.pending[-1].tolist() == [2] * len(batch["labels"])


def test_predictions_are_per_sample():
    stream = separable_stream()
    method, _ = build({"decomposition": "tr"})
    for task in stream.tasks:
        train_task(method, task, steps=1)
    batch = next(iter(SplitLoader(stream.tasks[1].test, method.model.backbone, 6, 1)))
    together = method.predict(batch)
    for row in range(len(batch["labels"])):
        single = {"inputs": {key: value[row : row + 1] for key, value in batch["inputs"].items()}}
        torch.testing.assert_close(method.predict(single), together[row : row + 1], atol=1e-5, rtol=0)
    permutation = torch.randperm(len(batch["labels"]), generator=torch.Generator().manual_seed(0))
    shuffled = {"inputs": {key: value[permutation] for key, value in batch["inputs"].items()}}
    torch.testing.assert_close(method.predict(shuffled), together[permutation], atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{"router": "cosine"}, {"decomposition": "tr"}])
def test_save_load_round_trip_reproduces_every_route(options):
    stream = separable_stream()
    method, _ = build(options)
    for task in stream.tasks[:2]:
        train_task(method, task, steps=1)
    state, extra = method.state_dict(), method.extra_state()
    restored, _ = build(options)
    restored.restore_structure(stream.tasks[:2])
    restored.load_state_dict(state)
    restored.load_extra_state(extra)
    assert restored.seed_sizes() == method.seed_sizes() and torch.equal(restored.router.slot_task, method.router.slot_task)
    batch = probe_batch(method, stream)
    for block in ("task_0", "task_1"):
        assert torch.equal(restored.adapted_features(batch["inputs"], block), method.adapted_features(batch["inputs"], block))
    plain = {"inputs": batch["inputs"]}
    assert torch.equal(restored.predict(plain), method.predict(plain))
    legacy, _ = build(options)  # a checkpoint written before 2026-12-02 kept the router under `metalora.router.`
    legacy.restore_structure(stream.tasks[:2])
    legacy.load_state_dict({key.replace("task_router.", "metalora.router.", 1): value for key, value in state.items()})
    assert torch.equal(legacy.predict(plain), method.predict(plain))
    # per-task storage: the block's parameters in fp32 plus its routing rows
    per_block = sum(v.numel() * 4 for k, v in state.items() if "task_1" in k)
    assert per_block == method.block_parameter_count("task_1") * 4


def test_shared_mode_distils_seeds_and_keeps_one_block():
    stream = separable_stream()
    method, _ = build({"cl_mode": "shared", "lambda_sd": 1.0})
    train_task(method, stream.tasks[0], steps=3)
    method.begin_task(stream.tasks[1])
    assert method.block_names() == ["shared"] and method.old_mapping is not None
    batch = next(iter(loader(method, stream.tasks[1].train, 1)))
    logits = method.forward(batch)
    assert method.extra_loss(batch, logits).item() == pytest.approx(0.0, abs=1e-12)  # same generator so far
    with torch.no_grad():
        method.state.mapping["shared"].out.bias.add_(0.5)
    logits = method.forward(batch)
    assert method.extra_loss(batch, logits).item() > 0
    naive, _ = build({"cl_mode": "naive"})
    train_task(naive, stream.tasks[0], steps=1)
    naive.begin_task(stream.tasks[1])
    assert naive.extra_loss(batch, naive.forward(batch)) is None and naive.block_names() == ["shared"]


def test_joint_mode_trains_jointly_and_static_control_has_no_mapping_net():
    method, _ = build({"cl_mode": "joint"})
    assert method.trains_jointly
    static, _ = build({"generate": False})
    stream = separable_stream()
    train_task(static, stream.tasks[0], steps=1)
    assert len(static.state.mapping) == 0 and static.mapping_is_zero("task_0")
    layer = next(iter(static.layers.values()))
    layer.active_block = "task_0"
    layer.merge()  # static update: mergeable
    layer.unmerge()


@pytest.mark.parametrize(
    "key,value",
    [
        ("decomposition", "tucker"),
        ("cp_rank", 0),
        ("tr_rank", 0),
        ("tr_seed", "half"),
        ("cp_conv_modes", 2),
        ("init", "random"),
        ("mapping_width", 0),
        ("cl_mode", "replay"),
        ("lambda_sd", -1.0),
        ("router", "soft"),
        ("extractor", "layer_input"),
        ("extractor_blocks", 0),
        ("extractor_blocks", 2),  # without extractor `blocks`
        ("adapted_blocks", 0),
        ("share_frozen_prefix", "sometimes"),
        ("mahalanobis_shrinkage", 2.0),
        ("alpha", 0.0),
        ("no_such_knob", 1),
    ],
)
def test_bad_option_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_config({"name": "metalora", key: value})


def test_warm_start_copies_the_previous_block_and_keeps_it_frozen():
    stream = separable_stream()
    method, _ = build({"warm_start": True})
    train_task(method, stream.tasks[0], steps=2)
    method.begin_task(stream.tasks[1])
    state = method.state_dict()
    copied = [key for key in state if "task_1" in key]
    assert copied and all(torch.equal(state[key], state[key.replace("task_1", "task_0")]) for key in copied)
    trainable = {id(p) for p in method.trainable_parameters()}
    assert all(id(p) not in trainable for layer in method.layers.values() for p in layer.blocks["task_0"].parameters())


def test_single_block_modes_serve_base_session_tasks_with_the_block():
    stream = separable_stream()
    method, _ = build({"cl_mode": "single"})
    method.model.head.add_classes(stream.tasks[0].class_ids)  # the engine's base session does this
    method.absorb_base_session(stream.tasks[0], loader(method, stream.tasks[0].train, 0))  # task 0: no block
    train_task(method, stream.tasks[1], steps=2)
    batch = next(iter(loader(method, stream.tasks[1].test, 1)))
    expected = method.model.scores(method.adapted_features(batch["inputs"], "shared"))
    assert torch.equal(method.predict({"inputs": batch["inputs"]}), expected)
    assert not torch.equal(expected, method.model.scores(method.adapted_features(batch["inputs"], None)))


def test_embed_extractor_reads_only_the_embedding_layer_and_keeps_the_invariants():
    """extractor embed: f(x) = masked mean of the embeddings module's output; identity at start, routing works."""
    stream = separable_stream()
    method, model = build({"extractor": "embed"})
    batch = probe_batch(method, stream)
    inputs = batch["inputs"]
    embedded = model.backbone.model.embeddings(input_ids=inputs["input_ids"])  # [B, L, H]
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = (embedded * mask).sum(1) / mask.sum(1)
    assert torch.allclose(method.frozen_features(inputs), expected, atol=1e-6)
    assert not torch.allclose(method.frozen_features(inputs), model.features(inputs))  # not the pooled output
    plain = model.features(inputs)
    method.begin_task(stream.tasks[0])
    assert torch.equal(method.adapted_features(inputs, "task_0"), plain)  # identity at initialisation
    method.end_task(stream.tasks[0], loader(method, stream.tasks[0].train, 0))
    for task in stream.tasks[1:]:
        train_task(method, task)
    assert routing_accuracy(method, stream) >= 0.99  # disjoint alphabets separate even on bag-of-embeddings features


def test_embed_extractor_refuses_a_backbone_without_embeddings():
    backbone = load_backbone("digits-resnet", seed=0)
    method = create_method("metalora", {"extractor": "embed"}, MethodContext(HeadConfig(), TrainConfig(), seed=0))
    with pytest.raises(ConfigError, match="extractor `embed`"):
        method.attach(ContinualClassifier(backbone))



def test_blocks_extractor_reads_the_first_blocks_only_and_keeps_the_invariants():
    """extractor blocks: f(x) = masked mean of the hidden states after block d (default ceil(2/3) = 1 of
    tiny-bert's 2), the later blocks never run, the hook is gone afterwards; identity at start, routing works."""
    stream = separable_stream()
    method, model = build({"extractor": "blocks"})
    assert method.extractor_depth == 1
    blocks = model.backbone.blocks()
    inputs = probe_batch(method, stream)["inputs"]
    hidden = model.backbone.model(**inputs, output_hidden_states=True).hidden_states[1]  # [B, L, H] after block 1
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    calls = []
    blocks[1].register_forward_hook(lambda module, args, output: calls.append(1))
    hooks_before = dict(blocks[0]._forward_hooks)
    features = method.frozen_features(inputs)
    assert not calls  # the second block never ran
    assert torch.allclose(features, (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)
    assert dict(blocks[0]._forward_hooks) == hooks_before  # the early-exit hook was removed
    plain = model.features(inputs)
    assert len(calls) == 1  # the full pass still runs every block
    method.begin_task(stream.tasks[0])
    assert torch.equal(method.adapted_features(inputs, "task_0"), plain)  # identity at initialisation
    method.end_task(stream.tasks[0], loader(method, stream.tasks[0].train, 0))
    for task in stream.tasks[1:]:
        train_task(method, task)
    assert routing_accuracy(method, stream) >= 0.99


def test_blocks_extractor_on_a_vit_reads_the_chosen_block():
    backbone = load_backbone("digits-vit", seed=0)
    pixels = torch.randn(3, backbone.num_channels, backbone.image_size, backbone.image_size)
    hidden = backbone.model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]  # [B, tokens, H]
    assert torch.allclose(backbone.block_features(2, pixel_values=pixels), hidden.mean(1), atol=1e-6)


def test_blocks_extractor_refuses_too_deep_a_read_and_backbones_without_blocks():
    context = MethodContext(HeadConfig(), TrainConfig(), seed=0)
    method = create_method("metalora", {"extractor": "blocks", "extractor_blocks": 3}, context)
    with pytest.raises(ConfigError, match="extractor_blocks 3 is more than the backbone's 2 blocks"):
        method.attach(ContinualClassifier(load_backbone("tiny-bert", seed=0)))
    method = create_method("metalora", {"extractor": "blocks"}, context)
    with pytest.raises(ConfigError, match="extractor `blocks`.*no transformer block stack"):
        method.attach(ContinualClassifier(load_backbone("digits-resnet", seed=0)))


def test_adapted_blocks_adapts_only_the_last_blocks_and_predict_replays_the_frozen_prefix_exactly():
    """adapted_blocks 1 of tiny-bert's 2: slots only in block 1; predict runs block 0 once per batch (the extractor
    pass) and replays its output in every adapted pass, with the scores of the full passes."""
    stream = separable_stream()
    method, model = build({"adapted_blocks": 1})
    assert method.layers and all(".layer.1." in name for name in method.layers)
    assert method.shared_prefix_depth == 1
    for task in stream.tasks:
        train_task(method, task)
    texts = stream.tasks[0].test.inputs[:3] + stream.tasks[2].test.inputs[:3]
    batch = {"inputs": model.backbone.collate(texts)}  # two tasks in one batch: two routed groups
    block_0_calls = []
    model.backbone.blocks()[0].register_forward_hook(lambda module, args, output: block_0_calls.append(1))
    replayed = method.predict({"inputs": batch["inputs"]})
    assert len(block_0_calls) == 1  # the extractor pass only, however many routed groups
    routes = method.routing_tally.pending[-1]
    assert len(routes.unique()) == 2
    method.shared_prefix_depth = 0  # the same weights without the replay: every pass runs block 0
    full = method.predict({"inputs": batch["inputs"]})
    assert len(block_0_calls) == 2 + len(routes.unique())
    assert torch.allclose(replayed, full, atol=1e-5) and torch.equal(replayed.argmax(1), full.argmax(1))
    assert model.backbone.blocks()[0].__class__.__name__ == "BertLayer"  # the real block is back in place


def test_prefix_is_replayed_only_where_it_is_exact_and_adapted_blocks_errors():
    assert build()[0].shared_prefix_depth == 0  # every block adapted: nothing below the first adapter
    assert build({"adapted_blocks": 1, "share_frozen_prefix": False})[0].shared_prefix_depth == 0
    assert build({"adapted_blocks": 1, "extractor": "embed"})[0].shared_prefix_depth == 0  # no frozen full pass
    with pytest.raises(ConfigError, match="adapted_blocks 3 is more than the backbone's 2 blocks"):
        build({"adapted_blocks": 3})
    context = MethodContext(HeadConfig(), TrainConfig(), seed=0)
    method = create_method("metalora", {"adapted_blocks": 1}, context)
    with pytest.raises(ConfigError, match="adapted_blocks.*no transformer block stack"):
        method.attach(ContinualClassifier(load_backbone("digits-resnet", seed=0)))


def test_mahalanobis_precision_is_cached_until_the_routing_statistics_change():
    stream = separable_stream()
    method, _ = build({"router": "mahalanobis"})
    train_task(method, stream.tasks[0])
    train_task(method, stream.tasks[1])
    features = method.frozen_features(probe_batch(method, stream)["inputs"])
    first = method.router.route(features)
    router = method.router
    cached = router.precision()
    assert torch.equal(method.router.route(features), first) and router.precision() is cached  # reused, same routes
    train_task(method, stream.tasks[2])  # new statistics: recomputed
    method.router.route(features)
    recomputed = router.precision()
    assert recomputed is not cached and not torch.equal(recomputed, cached)
    router._precision = None  # computing from scratch gives the cached matrix
    fresh = router.precision()
    assert fresh is not recomputed and torch.equal(fresh, recomputed)


# ----- every switch shows its effect ----------------------------------------------------------------------------------
def test_lambda_sd_scales_the_seed_distillation_and_zero_turns_it_off():
    """Shared mode, task 1 starts from task 0's untrained mapping net (zero output); shifting the live net's output
    bias by 0.5 moves all 4 x 8 seeds by 0.5: distillation = lambda_sd * 32 * 0.25 = 8 lambda_sd, none at 0."""
    stream = separable_stream()
    for weight in (0.0, 0.5, 3.0):
        method, _ = build({"cl_mode": "shared", "lambda_sd": weight})
        method.begin_task(stream.tasks[0])
        method.end_task(stream.tasks[0], loader(method, stream.tasks[0].train, 0))
        method.begin_task(stream.tasks[1])
        with torch.no_grad():
            method.state.mapping["shared"].out.bias.add_(0.5)
        batch = next(iter(loader(method, stream.tasks[1].train, 1)))
        extra = method.extra_loss(batch, method.forward(batch))
        if weight == 0:
            assert extra is None and method.old_mapping is None
        else:
            assert extra.item() == pytest.approx(8 * weight)


def test_unrestricted_routing_scores_every_seen_class():
    """restrict_to_routed_task False: each routed example gets finite scores for every seen class; restricting the
    same model afterwards keeps the routed task's scores and puts -inf on the others."""
    stream = separable_stream()
    method, model = build({"restrict_to_routed_task": False})
    for task in stream.tasks[:2]:
        train_task(method, task, steps=1)
    batch = {"inputs": model.backbone.collate(stream.tasks[0].test.inputs[:2] + stream.tasks[1].test.inputs[:2])}
    free = method.predict(batch)
    routes = method.routing_tally.pending[-1]
    assert routes.tolist() == [0, 0, 1, 1] and free.shape == (4, 4) and torch.isfinite(free).all()
    method.options.restrict_to_routed_task = True
    restricted = method.predict(batch)
    for row, route in enumerate(routes.tolist()):
        own = stream.tasks[route].class_ids
        others = [c for c in range(4) if c not in own]
        assert torch.equal(restricted[row, own], free[row, own])
        assert torch.isinf(restricted[row, others]).all() and torch.isfinite(free[row, others]).all()


def test_extractor_blocks_sets_the_depth_the_features_are_read_at():
    """extractor_blocks 2 of tiny-bert's 2: f(x) is the masked mean after block 2 (both blocks run), not after
    block 1 as the default depth (a third of the stack, rounded up) reads."""
    stream = separable_stream()
    method, model = build({"extractor": "blocks", "extractor_blocks": 2})
    default, _ = build({"extractor": "blocks"})
    assert (method.extractor_depth, default.extractor_depth) == (2, 1)
    inputs = probe_batch(method, stream)["inputs"]
    hidden = model.backbone.model(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    after = [(states * mask).sum(1) / mask.sum(1) for states in hidden]
    calls = []
    model.backbone.blocks()[1].register_forward_hook(lambda module, args, output: calls.append(1))
    features = method.frozen_features(inputs)
    assert calls == [1]
    assert torch.allclose(features, after[2], atol=1e-6) and not torch.allclose(features, after[1], atol=1e-3)
    assert torch.allclose(default.frozen_features(inputs), after[1], atol=1e-6)


def test_cache_features_false_keeps_the_feature_cache_empty():
    """The training forward and the routing features read f(x) through the cache; off, nothing is stored and the
    features (so the logits) are the same."""
    stream = separable_stream()
    logits = {}
    for cache in (True, False):
        method, _ = build({"cache_features": cache})
        method.begin_task(stream.tasks[0])
        batch = next(iter(loader(method, stream.tasks[0].train, 0)))
        logits[cache] = method.forward(batch).detach()
        method.batch_routing_features(batch)
        assert len(method.feature_cache) == (len(batch["labels"]) if cache else 0)
    assert torch.equal(logits[True], logits[False])
