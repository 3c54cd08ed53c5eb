"""fm_lora method invariants (specs/fm-lora.md section 9): DRS masks, H, prompt, parameter count, options."""

import math

import pytest
import torch
from helpers import tiny_config, tiny_text_stream

from loracl.adapters.prompts import PREFIX_ATTENTION, prefix_attention
from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import validate_config
from loracl.errors import ConfigError, LoraclError
from loracl.methods.base import MethodContext
from loracl.methods.fm_lora import spectral_complexity, subspace_overlap
from loracl.methods.registry import create_method


def _method(backbone: str = "tiny-bert", **options):
    config = tiny_config("seq_lora", backbone=backbone)
    model = ContinualClassifier(load_backbone(backbone))
    method = create_method("fm_lora", {"rank": 4, "prompt_len": 2, "complexity_samples": 16, **options}, MethodContext(config.head, config.train, 0))
    method.attach(model)
    return method, model


def _batch(model, task):
    inputs = model.backbone.collate(task.train.inputs[:8])
    return {"inputs": inputs, "labels": torch.tensor(task.train.labels[:8])}


STREAM = tiny_text_stream(2)


def test_identity_at_attach_without_prompt_and_prompt_changes_features():
    task = STREAM.tasks[0]
    model = ContinualClassifier(load_backbone("tiny-bert"))
    inputs = _batch(model, task)["inputs"]
    before = model.features(inputs)
    method, _ = _method(prompt_len=0)
    assert torch.equal(method.model.features(inputs), before)
    prompted, _ = _method(prompt_len=3, prompt_init_std=1.0)
    after = prompted.model.features(inputs)
    assert after.shape == before.shape and not torch.allclose(after, before, atol=1e-4)


@pytest.mark.parametrize("pooling_backbone", ["tiny-bert", "tiny-vit", "tiny-modernbert"])
def test_prompt_tokens_never_reach_the_output_and_padding_is_respected(pooling_backbone):
    method, model = _method(pooling_backbone, prompt_len=3, prompt_init_std=1.0)
    captured = {}
    handle = model.backbone.model.register_forward_hook(lambda m, a, out: captured.update(tokens=out.last_hidden_state.shape[1]))
    if pooling_backbone != "tiny-vit":  # ModernBERT: rotary positions come after the embeddings
        texts = ["ab", "a much longer sentence"]
        inputs = model.backbone.collate(texts)
        alone = model.features(model.backbone.collate(texts[:1]))
        batched = model.features(inputs)
        assert torch.allclose(batched[0], alone[0], atol=1e-5)  # the mask extension keeps padding masked
        expected_tokens = inputs["input_ids"].shape[1]
    else:
        images = [torch.rand(1, 8, 8).numpy() for _ in range(2)]
        model.features(model.backbone.collate(images))
        expected_tokens = 1 + (8 // 2) ** 2
    handle.remove()
    assert captured["tokens"] == expected_tokens


def test_identity_at_task_start_after_a_finished_task():
    method, model = _method()
    first, second = STREAM.tasks
    batch = _batch(model, first)
    method.begin_task(first)
    method.prepare_task(first, [])
    with torch.no_grad():
        for layer in method.layers.values():
            layer.core_N.normal_()
    method.end_task(first, [])
    model.eval()
    before = model.features(batch["inputs"])
    method.begin_task(second)
    method.prepare_task(second, [])
    for rank in method.candidate_ranks:
        for layer in method.layers.values():
            layer.rank_mask = method.prefix_mask(rank)
        assert torch.allclose(model.features(batch["inputs"]), before, atol=1e-6)


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
def test_drs_masks_temperature_commit_and_bias_gradient(granularity):
    method, model = _method(rank_loss_weight=0.5, drs_granularity=granularity)
    groups = len(method.layers) if granularity == "per_layer" else 1
    assert method.state.drs_bias.view(-1, len(method.candidate_ranks)).shape[0] == groups
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    method.total_steps = 20
    model.train()
    for step in range(12):  # before the commit phase (the last 10 %)
        method.step = step
        masks = method.sample_mask()
        assert masks.shape == (groups, method.options.rank)
        for mask in masks.detach():
            assert set(mask.tolist()) <= {0.0, 1.0}
            ones = int(mask.sum())
            assert ones in method.candidate_ranks and torch.equal(mask, method.prefix_mask(ones))
    sampled = method.sample_mask  # forward hands row i of this step's masks to layer i (the one row to all, global)
    known = torch.stack([method.prefix_mask(method.candidate_ranks[i % len(method.candidate_ranks)]) for i in range(groups)])
    method.sample_mask = lambda: known
    method.forward(_batch(model, task))
    method.sample_mask = sampled
    for index, layer in enumerate(method.layers.values()):
        assert torch.equal(layer.rank_mask, known[index if groups > 1 else 0])
    loss = method.extra_loss(_batch(model, task), None)
    loss.backward()
    assert method.state.drs_bias.grad is not None and method.state.drs_bias.grad.abs().sum() > 0
    if groups > 1:  # every layer's logits get their own gradient
        assert (method.state.drs_bias.grad.abs().sum(dim=1) > 0).all()
    temperatures = [method.temperature(step) for step in range(21)]
    assert all(a >= b for a, b in zip(temperatures, temperatures[1:]))
    assert math.isclose(temperatures[10], method.options.tau_min) and math.isclose(temperatures[20], method.options.tau_min)
    method.step = 19
    assert method.in_commit_phase()
    with torch.no_grad():  # make the selectors disagree so per-layer commits are visible
        method.state.drs_bias.copy_(torch.randn(method.state.drs_bias.shape, generator=torch.Generator().manual_seed(3)) * 5)
    expected = [method.candidate_ranks[int(index)] for index in method.selector_logits().argmax(dim=1)]
    assert torch.equal(method.sample_mask(), torch.stack([method.prefix_mask(rank) for rank in expected]))
    method.end_task(task, [])
    assert method.chosen_ranks == [expected[0] if groups == 1 else expected]
    for layer, rank in zip(method.layers.values(), expected * len(method.layers) if groups == 1 else expected):
        assert layer.kept_cores.N_0.shape == (method.options.rank, rank)


@pytest.mark.parametrize("drs", ["gumbel", "off"])
def test_task_loss_alone_trains_the_drs_bias_through_the_straight_through_mask(drs):
    """The hard rank mask is hard - sg(pi) + pi: forward uses the one-hot choice, backward sends the task loss's
    gradient w.r.t. the mask into the selector bias b. With no rank loss and no prompt, the task loss alone gives b a
    gradient (its value on hand-set inputs: the next test); with drs off the mask is fixed and b gets nothing."""
    method, model = _method(drs=drs, prompt_len=0, rank_loss_weight=0.0, head_init="uniform")
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    method.total_steps = 20
    with torch.no_grad():  # N_t = 0 at the start would make the output independent of the mask
        for layer in method.layers.values():
            layer.core_N.normal_(generator=torch.Generator().manual_seed(1))
    model.train()
    batch = _batch(model, task)
    logits = method.forward(batch)
    assert method.extra_loss(batch, logits) is None  # the first task, no rank loss: only the task loss trains b
    method.task_loss(logits, batch).backward()
    bias = method.state.drs_bias
    if drs == "off":
        assert not bias.requires_grad and bias.grad is None
        return
    assert bias.grad is not None and torch.isfinite(bias.grad).all() and bias.grad.abs().sum() > 0
    assert float(bias.grad.sum()) == pytest.approx(0.0, abs=1e-6)  # a softmax's logits: the gradient sums to zero


@pytest.mark.parametrize(
    "weights, mask, gradient",
    [
        # pi = (1/4, 1/4, 1/4, 1/4): the tie picks the first candidate; dL/db = (t - mean t) / (4 tau) = [-4, -2, 1, 5] / 8
        ([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [-0.5, -0.25, 0.125, 0.625]),
        # pi = (1, 1, 1, 5) / 8: rank 4 picked; sum pi t = 60 / 8 = 7.5; dL/db_k = pi_k (t_k - 7.5) / tau
        ([1.0, 1.0, 1.0, 5.0], [1.0, 1.0, 1.0, 1.0], [-0.40625, -0.28125, -0.09375, 0.78125]),
    ],
)
def test_straight_through_mask_gradient_on_hand_set_inputs(monkeypatch, weights, mask, gradient):
    """Candidates 1, 2, 3, 4 of rank 4, drs_beta 0 (the logits are b), tau 2, b = tau ln(w) so pi is w normalised,
    a constant Gumbel noise (it cancels), and L = g . mask with g = (1, 2, 3, 4): each candidate's prefix mask
    gives t = g . c_k = (1, 3, 6, 10); the forward mask is the argmax candidate's prefix, and b's gradient
    pi_k (t_k - sum_j pi_j t_j) / tau, worked out by hand."""
    method, model = _method(drs="gumbel", drs_beta=0.0, tau_start=2.0, tau_min=1.0, prompt_len=0)
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    method.total_steps = 20
    model.train()
    assert method.candidate_ranks == [1, 2, 3, 4] and method.temperature() == 2.0
    with torch.no_grad():
        method.state.drs_bias.copy_(2.0 * torch.tensor(weights).log())
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None: torch.full(shape, 0.5))
    masks = method.sample_mask()
    monkeypatch.undo()
    assert masks.tolist() == [mask]
    (masks[0] * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert method.state.drs_bias.grad.tolist() == pytest.approx(gradient, abs=1e-6)


def test_deterministic_drs_picks_the_nearest_rank_and_off_uses_r():
    method, _ = _method(drs="deterministic")
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    complexity = method.complexity[-1]["H"]
    nearest = min(method.candidate_ranks, key=lambda rank: abs(rank / 4 - complexity))
    assert not method.state.drs_bias.requires_grad
    method.end_task(task, [])
    assert method.chosen_ranks == [nearest]
    off, _ = _method(drs="off")
    off.begin_task(task)
    off.prepare_task(task, [])
    off.end_task(task, [])
    assert off.chosen_ranks == [4]


def test_complexity_measure_properties():
    generator = torch.Generator().manual_seed(0)
    h_spec, _ = spectral_complexity(torch.randn(4000, 16, generator=generator))
    assert 0.95 < h_spec <= 1.0
    low_rank = torch.randn(500, 2, generator=generator) @ torch.randn(2, 16, generator=generator)
    assert spectral_complexity(low_rank)[0] < 0.5
    method, _ = _method(complexity_samples=1024)  # all 24 examples, so a copy of the task has the same covariance
    task = STREAM.tasks[0]
    first = method.measure_task(task)
    assert first["h_sim"] == 1.0
    again = method.measure_task(task.__class__("copy", 5, task.class_ids, task.train, task.test))
    assert again["h_sim"] == pytest.approx(0.0, abs=1e-5)  # identical data: same subspace
    basis = torch.linalg.qr(torch.randn(16, 4, generator=generator))[0]
    assert subspace_overlap(basis, basis) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "options", [{}, {"core_form": "single", "drs_granularity": "per_layer", "prompt_depth": "deep", "prompt_layers": 2}]
)
def test_trainable_parameter_count_matches_the_formula(options):
    method, model = _method(prompt_len=3, **options)
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    groups = method.parameter_groups(1e-3, 1e-2)
    counted = sum(parameter.numel() for group in groups for parameter in group["params"])
    layers, rank, hidden = len(method.layers), 4, model.backbone.hidden_size
    cores = layers * (1 if options.get("core_form") == "single" else 2) * rank * rank
    prompt = 2 * 2 * 3 * hidden if options.get("prompt_depth") == "deep" else 3 * hidden  # deep: blocks x (K, V) x L_p x d
    selectors = (layers if options.get("drs_granularity") == "per_layer" else 1) * len(method.candidate_ranks)
    assert counted == cores + prompt + selectors + (hidden + 1) * len(task.class_ids)
    assert any(group["lr"] == pytest.approx(1e-2) and group["params"] == [method.state.drs_bias] for group in groups)
    trainable = {id(parameter) for parameter in model.parameters() if parameter.requires_grad}
    assert trainable == {id(parameter) for group in groups for parameter in group["params"]}


@pytest.mark.parametrize("step, expected_equal_to", [(1.0, "trained"), (0.0, "anchor"), (0.5, "half")])
def test_meta_prompt_update(step, expected_equal_to):
    method, _ = _method(meta_step=step)
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    anchor = method.state.prompt.prompts.detach().clone()
    with torch.no_grad():
        method.state.prompt.prompts.add_(1.0)
    trained = method.state.prompt.prompts.detach().clone()
    method.end_task(task, [])
    after = method.state.prompt.prompts.detach()
    target = {"trained": trained, "anchor": anchor, "half": anchor + 0.5}[expected_equal_to]
    assert torch.allclose(after, target, atol=1e-6)


def test_prompt_anchor_loss_only_after_the_first_task():
    method, model = _method(rank_loss_weight=0.0)
    first, second = STREAM.tasks
    method.begin_task(first)
    method.prepare_task(first, [])
    assert method.extra_loss(_batch(model, first), None) is None
    method.end_task(first, [])
    method.begin_task(second)
    method.prepare_task(second, [])
    with torch.no_grad():
        method.state.prompt.prompts.add_(0.5)
    loss = method.extra_loss(_batch(model, second), None)
    expected = method.options.prompt_anchor_weight * 0.25 * method.state.prompt.prompts.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_dynamic_prompt_components_are_input_conditioned():
    method, model = _method(prompt_components=3, prompt_init_std=1.0)
    prompt = method.state.prompt
    embedded = torch.randn(2, 5, model.backbone.hidden_size)
    mixed = prompt.current(embedded)
    assert mixed.shape == (2, 2, model.backbone.hidden_size)
    assert not torch.allclose(mixed[0], mixed[1])


@pytest.mark.parametrize(
    "options, key",
    [
        ({"rank": 0}, "rank"),
        ({"candidate_ranks": [4, 2]}, "candidate_ranks"),
        ({"candidate_ranks": [2, 16]}, "candidate_ranks"),
        ({"tau_min": 2.0}, "tau_min"),
        ({"anneal_fraction": 0.95, "commit_fraction": 0.1}, "anneal_fraction"),
        ({"shared_basis": "pca"}, "shared_basis"),
        ({"drs": "sometimes"}, "drs"),
        ({"prompt_len": -1}, "prompt_len"),
        ({"meta_step": 1.5}, "meta_step"),
        ({"core_orth_weight": 0.1, "keep_task_cores": False}, "core_orth_weight"),
        ({"spectral_weight": 0.0, "similarity_weight": 0.0}, "spectral_weight"),
        ({"head_init": "normal"}, "head_init"),
        ({"ranks": 4}, "ranks"),
        ({"core_form": "triple"}, "core_form"),
        ({"core_form": "single", "core_orth_weight": 0.1}, "core_orth_weight"),
        ({"prompt_depth": "middle"}, "prompt_depth"),
        ({"prompt_depth": "deep", "prompt_components": 3}, "prompt_components"),
        ({"prompt_layers": 0}, "prompt_layers"),
        ({"drs_granularity": "per_head"}, "drs_granularity"),
        ({"drs_granularity": "per_layer", "drs": "deterministic"}, "drs_granularity"),
        ({"prompt_depth": "deep", "prompt_len": 0}, "prompt_depth"),
        ({"prompt_layers": 2}, "prompt_layers"),
        ({"routed_cores": "as_of_task"}, "routed_cores"),
        ({"routed_cores": "own_task", "routed_inference": True, "keep_task_cores": False}, "routed_cores"),
        ({"routed_cores": True, "routed_inference": True}, "routed_cores"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": [{"name": "fm_lora", **options}]})


@pytest.mark.parametrize("mode, trains_later", [("learn_first_task", False), ("learn_every_task", True), ("svd", False)])
def test_which_tasks_train_the_shared_bases(mode, trains_later):
    method, _ = _method(shared_basis=mode)
    first, second = STREAM.tasks
    method.begin_task(first)
    method.prepare_task(first, [])
    layer = next(iter(method.layers.values()))
    learned = mode.startswith("learn")
    assert layer.shared_A.requires_grad == learned and layer.shared_B.requires_grad == learned
    assert layer.core_N.requires_grad != learned  # learned bases start with M = N = I frozen
    assert method._drs_mode() == ("off" if learned else "gumbel")
    method.end_task(first, [])
    assert not layer.shared_A.requires_grad
    method.begin_task(second)
    method.prepare_task(second, [])
    assert layer.shared_A.requires_grad == trains_later and layer.core_N.requires_grad
    assert torch.equal(layer.core_N, torch.zeros_like(layer.core_N))
    assert method._drs_mode() == "gumbel"


def _reference_prefix_attention(query, key, value, prefix_key, prefix_value, keep, scaling):
    """Brute force: softmax(q [pk; k]^T s + mask) [pv; v], heads split by hand."""
    batch, heads, _, head_dim = key.shape
    split = lambda tokens: tokens.view(-1, heads, head_dim).transpose(0, 1).expand(batch, -1, -1, -1)  # noqa: E731
    keys = torch.cat([split(prefix_key), key], dim=2)
    values = torch.cat([split(prefix_value), value], dim=2)
    scores = query @ keys.transpose(-1, -2) * scaling
    visible = torch.cat([torch.ones(batch, prefix_key.shape[0], dtype=torch.bool), keep], dim=1)[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_prefix_attention_matches_brute_force(mask_kind):
    generator = torch.Generator().manual_seed(0)
    batch, heads, length, head_dim, prefix_length = 2, 3, 5, 4, 2
    query, key, value = (torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3))
    prefix_key, prefix_value = (torch.randn(prefix_length, heads * head_dim, generator=generator) for _ in range(2))
    keep = torch.ones(batch, length, dtype=torch.bool)
    if mask_kind != "none":
        keep[1, 3:] = False
    mask = {
        "bool": keep[:, None, None, :].expand(batch, 1, length, length),
        "additive": (~keep[:, None, None, :]).float() * torch.finfo(torch.float32).min,
        "none": None,
    }[mask_kind]
    module = torch.nn.Module()
    module.loracl_prefix = lambda: (prefix_key, prefix_value)
    output, _ = prefix_attention(module, query, key, value, mask, scaling=0.5)
    expected = _reference_prefix_attention(query, key, value, prefix_key, prefix_value, keep, 0.5)
    assert output.shape == (batch, length, heads, head_dim)
    assert torch.allclose(output, expected, atol=1e-5)
    module.loracl_prefix = lambda: (prefix_key[:, :5], prefix_value[:, :5])
    with pytest.raises(LoraclError, match="deep prompt width 5"):
        prefix_attention(module, query, key, value, mask)


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-vit", "tiny-modernbert"])
def test_deep_prompt_changes_only_the_prefixed_blocks_and_respects_padding(backbone):
    plain = ContinualClassifier(load_backbone(backbone))
    method, model = _method(backbone, prompt_depth="deep", prompt_layers=1, prompt_len=3, prompt_init_std=1.0)
    blocks = [module for module in model.backbone.model.modules() if hasattr(module, "loracl_prefix")]
    assert len(blocks) == 1 and blocks[0].config._attn_implementation == PREFIX_ATTENTION
    assert model.backbone.model.config._attn_implementation != PREFIX_ATTENTION  # the other blocks keep theirs
    prompt_keys = {key for key in model.state_dict() if key.startswith("fm_lora.")}
    bare, _ = _method(backbone, prompt_len=0)
    assert set(model.state_dict()) - prompt_keys == set(bare.model.state_dict()) - {k for k in bare.model.state_dict() if k.startswith("fm_lora.")}
    if backbone != "tiny-vit":
        texts = ["ab", "a much longer sentence"]
        inputs = model.backbone.collate(texts)
        alone = model.features(model.backbone.collate(texts[:1]))
        assert torch.allclose(model.features(inputs)[0], alone[0], atol=1e-5)  # padding stays masked
    else:
        inputs = model.backbone.collate([torch.rand(1, 8, 8).numpy() for _ in range(2)])
    model.eval()
    plain.eval()
    prompted = model.features(inputs)
    assert not torch.allclose(prompted, plain.features(inputs), atol=1e-4)
    with method.adapters_bypassed():
        assert torch.allclose(model.features(inputs), plain.features(inputs), atol=1e-5)
    with pytest.raises(LoraclError, match="prompt_layers 9"):
        _method(backbone, prompt_depth="deep", prompt_layers=9)
    default, _ = _method(backbone, prompt_depth="deep")  # blocks 0-4, cut to the 2 blocks a tiny model has
    assert default.state.prompt.prompts.shape[0] == 2


def test_deep_prompt_refuses_a_causal_model():
    from transformers import BertConfig, BertModel

    from loracl.adapters.prompts import PrefixPrompt

    decoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, is_decoder=True))
    with pytest.raises(LoraclError, match="causal"):
        PrefixPrompt(2, 32, 2, 0.02, torch.Generator().manual_seed(0)).install(decoder)


@pytest.mark.parametrize("mode", ["as_of_task", "own_task"])
def test_routed_cores_serve_the_model_as_of_each_task_and_restore_the_final_one(mode):
    method, model = _method(prompt_len=0, routed_inference=True, routed_cores=mode)
    first, second = STREAM.tasks
    inputs = _batch(model, first)["inputs"]
    model.eval()
    as_of = []
    for seed, task in enumerate(STREAM.tasks):
        method.begin_task(task)
        method.prepare_task(task, [])
        with torch.no_grad():
            for layer in method.layers.values():
                layer.core_N.copy_(torch.randn(layer.core_N.shape, generator=torch.Generator().manual_seed(seed)))
        method.end_task(task, [])
        as_of.append(model.features(inputs))
    assert not torch.allclose(as_of[0], as_of[1], atol=1e-4)
    with method.serving_as_of(0):  # task 0 is first: its own cores are also everything up to it
        assert torch.allclose(model.features(inputs), as_of[0], atol=1e-5)
    with method.serving_as_of(1):
        served = model.features(inputs)
        only_second = {name: layer.accumulated_core.clone() for name, layer in method.layers.items()}
    if mode == "as_of_task":
        assert torch.allclose(served, as_of[1], atol=1e-5)
    else:  # task 1's increment alone: K = N_1 D(m_1) M_1, not K_0 + that
        for name, layer in method.layers.items():
            assert torch.allclose(only_second[name], layer.kept_task_core("1"), atol=1e-6)
        assert not torch.allclose(served, as_of[1], atol=1e-4)
    assert torch.equal(model.features(inputs), as_of[1])  # the final K is back bit for bit


def test_routed_cores_hide_a_later_live_task_refuse_merged_layers_and_restore_on_errors():
    method, model = _method(prompt_len=0, routed_inference=True, routed_cores="as_of_task")
    first, second = STREAM.tasks
    inputs = _batch(model, first)["inputs"]
    model.eval()
    method.begin_task(first)
    method.prepare_task(first, [])
    with torch.no_grad():
        for layer in method.layers.values():
            layer.core_N.normal_(generator=torch.Generator().manual_seed(0))
    method.end_task(first, [])
    after_first = model.features(inputs)
    method.begin_task(second)  # live and trained a little: a mid-task prediction of a task-0 example
    method.prepare_task(second, [])
    with torch.no_grad():
        for layer in method.layers.values():
            layer.core_N.normal_(generator=torch.Generator().manual_seed(1))
    live = model.features(inputs)
    with method.serving_as_of(0):
        assert torch.allclose(model.features(inputs), after_first, atol=1e-5)
    assert torch.equal(model.features(inputs), live) and all(layer.task_live for layer in method.layers.values())
    broken = list(method.layers.values())[-1]  # the earlier layers' K are already rebuilt when it fails
    broken.kept_task_core = lambda key: (_ for _ in ()).throw(RuntimeError("bad buffer"))
    with pytest.raises(RuntimeError, match="bad buffer"):
        with method.serving_as_of(1):
            pass
    del broken.kept_task_core
    assert torch.equal(model.features(inputs), live)  # every K and the live cores are back
    for layer in method.layers.values():
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with method.serving_as_of(0):
            pass


def test_prefix_attention_refuses_a_call_that_asks_for_causal_attention():
    """CLIP's text encoder passes is_causal per call (its module flag is False): the prefix path would drop it."""

    class Module(torch.nn.Module):
        is_causal = False

        def loracl_prefix(self):
            return None

    query = torch.zeros(1, 2, 3, 4)
    with pytest.raises(LoraclError, match="attends causally"):
        prefix_attention(Module(), query, query, query, None, is_causal=True)
    output, _ = prefix_attention(Module(), query, query, query, None)
    assert output.shape == (1, 3, 2, 4)


def test_gumbel_gate_samples_while_training_and_is_the_committed_mask_at_eval():
    """Mid-task, before the commit phase: training draws different masks; eval mode (forward and predict) always
    uses the noise-free committed mask, so two evaluations agree and equal a run forced to that mask."""
    method, model = _method(rank=8)
    task = STREAM.tasks[0]
    method.begin_task(task)
    method.prepare_task(task, [])
    method.total_steps, method.step = 100, 0
    with torch.no_grad():  # non-zero live update so the mask changes the output; flat selector logits
        for parameter in method.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
        method.state.drs_bias.zero_()
    model.train()
    drawn = {tuple(method.sample_mask().detach().flatten().tolist()) for _ in range(40)}
    assert len(drawn) > 1  # the training gate is stochastic
    batch = _batch(model, task)
    committed = method.committed_masks()
    for seed in range(20):  # leave the layers with a sampled mask that is not the committed one
        torch.manual_seed(seed)
        method._noise.manual_seed(seed)
        with torch.no_grad():
            method.forward(batch)
        if any(not torch.equal(layer.rank_mask, committed[0]) for layer in method.layers.values()):
            break
    model.eval()
    with torch.no_grad():
        predicted = method.predict(batch)  # prediction sets the committed mask itself
        assert all(torch.equal(method.sample_mask(), committed) for _ in range(5))
        first, second = method.forward(batch), method.forward(batch)
        assert torch.equal(first, second) and torch.equal(predicted, method.predict(batch))
        method._set_layer_masks(committed)
        assert torch.allclose(method.score(batch), predicted, atol=1e-6)
