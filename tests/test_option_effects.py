"""Every method switch shows its effect: each test sets an option away from its default and asserts something that
would not hold if the option were ignored (hand-set inputs, literal or structural expectations)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_text_stream

from loracl.adapters.gated import orthogonality_loss
from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, TrainConfig
from loracl.methods.base import MethodContext
from loracl.methods.registry import create_method

STREAM = tiny_text_stream(2, train=8, test=4)
FIRST, SECOND = STREAM.tasks


def attached(name: str, seed: int = 0, **options):
    """A fresh tiny-bert classifier with method `name` attached (options as given)."""
    model = ContinualClassifier(load_backbone("tiny-bert", max_length=32, seed=0))
    context = MethodContext(HeadConfig(), TrainConfig(progress=False), seed=seed, num_tasks=2)
    method = create_method(name, options, context)
    method.attach(model)
    return method


def text_batch(method, task, count: int = 4) -> dict:
    model = method.model
    return {
        "inputs": model.backbone.collate(task.train.inputs[:count]),
        "labels": torch.tensor(task.train.labels[:count]),
        "task_ids": torch.full((count,), task.index),
    }


def seeded(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ===== OA-Adapter ======================================================================================
def oa_after_first_task(old_scale: float = 1.0, **options):
    """oa_adapter with a trained-looking task 0 (hand-set up-projections, every gate open), finished, and task 1
    begun with hand-set up-projections; the same tensors whatever the options."""
    method = attached("oa_adapter", **options)
    method.begin_task(FIRST)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.copy_(seeded(*branch.up.shape, seed=index, scale=old_scale))
            branch.gate.fill_(0.5)
    method.end_task(FIRST, [])
    method.begin_task(SECOND)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.copy_(seeded(*branch.up.shape, seed=100 + index))
    return method


@pytest.mark.parametrize("orth_lambda", [0.25, 2.0])
def test_oa_orth_lambda_weights_the_penalty_on_the_second_task(orth_lambda):
    method = oa_after_first_task(orth_lambda=orth_lambda)
    unweighted = sum(
        orthogonality_loss(branch.up, method.history[site]) for site, branch in method.current_branches().items()
    )
    assert unweighted > 1.0
    extra = method.extra_loss(None, None)
    assert extra is not None and torch.allclose(extra, orth_lambda * unweighted, rtol=1e-5)


def test_oa_orth_lambda_zero_adds_no_loss():
    method = oa_after_first_task(orth_lambda=0.0)
    assert method.orthogonality_penalty() > 0 and method.extra_loss(None, None) is None


@pytest.mark.parametrize("train_threshold", [True, False])
def test_oa_train_threshold_decides_whether_tau_trains(train_threshold):
    method = attached("oa_adapter", train_threshold=train_threshold)
    method.begin_task(FIRST)
    trainable = {id(parameter) for parameter in method.trainable_parameters()}
    for branch in method.current_branches().values():
        assert branch.threshold.requires_grad is train_threshold
        assert (id(branch.threshold) in trainable) is train_threshold
        assert branch.gate.requires_grad and id(branch.gate) in trainable


@pytest.mark.parametrize("orth_current, zero_penalty", [("all", False), ("active_scaled", True)])
def test_oa_orth_current_active_scaled_ignores_a_closed_gate_column(orth_current, zero_penalty):
    """Only column 0 of the new up-projection is non-zero and its gate is closed: `all` still counts it, the
    gate-scaled columns are all zero."""
    method = oa_after_first_task(orth_current=orth_current)
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
def test_oa_orth_normalize_makes_the_penalty_blind_to_the_old_columns_scale(normalize, expected_ratio):
    plain = oa_after_first_task(orth_normalize=normalize).orthogonality_penalty()
    tripled = oa_after_first_task(old_scale=3.0, orth_normalize=normalize).orthogonality_penalty()
    assert plain > 0 and (tripled / plain).item() == pytest.approx(expected_ratio, rel=1e-4)


def oa_two_finished_tasks(**options):
    """Two finished tasks whose branches both change the features (hand-set, no training)."""
    method = attached("oa_adapter", **options)
    for index, task in enumerate((FIRST, SECOND)):
        method.begin_task(task)
        with torch.no_grad():
            for site_index, branch in enumerate(method.current_branches().values()):
                branch.up.copy_(seeded(*branch.up.shape, seed=10 * index + site_index, scale=3.0))
                branch.gate.fill_(1.0)
        method.end_task(task, [])
    method.model.eval()
    return method


@torch.no_grad()
def scores_with_branches_off(method, batch, names: set[str]) -> torch.Tensor:
    """The classifier's scores with the named branches switched off in every layer (outside the method)."""
    for layer in method.layers.values():
        layer.disabled_branches = set(names)
    try:
        return method.model.predict(batch)
    finally:
        for layer in method.layers.values():
            layer.disabled_branches = set()


@pytest.mark.parametrize("inference", ["sum", "task_oracle"])
def test_oa_inference_task_oracle_serves_only_the_tasks_own_branch(inference):
    method = oa_two_finished_tasks(inference=inference)
    batch = text_batch(method, FIRST)
    summed = scores_with_branches_off(method, batch, set())
    own_only = scores_with_branches_off(method, batch, {"task_1"})
    assert not torch.allclose(summed, own_only, atol=1e-4)
    expected = own_only if inference == "task_oracle" else summed
    assert torch.allclose(method.predict(batch), expected, atol=1e-6)


@pytest.mark.parametrize("scope, distinct", [("site", 4), ("layer", 2), ("global", 1)])
def test_oa_tau_scope_shares_one_threshold_per_block(scope, distinct):
    method = attached("oa_adapter", tau_scope=scope)
    method.begin_task(FIRST)
    branches = method.current_branches()
    assert len(branches) == 4 and len({id(branch.threshold) for branch in branches.values()}) == distinct
    if scope == "layer":  # query and value of one block share theirs, the two blocks do not
        for block in ("encoder.layer.0", "encoder.layer.1"):
            assert len({id(branch.threshold) for site, branch in branches.items() if block in site}) == 1


@pytest.mark.parametrize("clamp", [True, False])
def test_oa_clamp_threshold_clamps_a_negative_tau_after_a_step(clamp):
    method = attached("oa_adapter", clamp_threshold=clamp)
    method.begin_task(FIRST)
    with torch.no_grad():
        for branch in method.current_branches().values():
            branch.threshold.fill_(-0.02)
    method.after_step()
    for branch in method.current_branches().values():
        assert branch.threshold.item() == pytest.approx(0.0 if clamp else -0.02)


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_oa_scaling_multiplies_the_branch_output(scaling):
    method = attached("oa_adapter", scaling=scaling)
    method.begin_task(FIRST)
    branch = next(iter(method.current_branches().values()))
    with torch.no_grad():
        branch.up.copy_(seeded(*branch.up.shape, seed=3))
        branch.gate.fill_(0.5)
    x = seeded(2, branch.down.shape[1], seed=4)
    unscaled = (x @ branch.down.T * branch.gamma()) @ branch.up.T  # W2 diag(gamma) W1 x, scale 1
    assert torch.allclose(branch(x), scaling * unscaled, atol=1e-6)


def test_oa_gate_and_tau_init_set_the_starting_values():
    method = attached("oa_adapter", gate_init=-0.3, tau_init=0.05)
    method.begin_task(FIRST)
    for branch in method.current_branches().values():
        assert torch.equal(branch.gate, torch.full_like(branch.gate, -0.3))
        assert branch.threshold.item() == pytest.approx(0.05)
        assert torch.allclose(branch.gamma(), torch.full_like(branch.gate, -0.25))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_oa_down_init_gaussian_draws_w1_with_std_one_over_r(init):
    """Rank 2: N(0, 1/r^2) has std 0.5; Kaiming-uniform on fan-in 32 stays within 1/sqrt(32) ~ 0.18."""
    method = attached("oa_adapter", rank=2, down_init=init)
    method.begin_task(FIRST)
    values = torch.cat([branch.down.detach().flatten() for branch in method.current_branches().values()])
    assert values.numel() == 4 * 2 * 32
    if init == "gaussian":
        assert values.std().item() == pytest.approx(0.5, rel=0.15) and values.abs().max() > 2 / math.sqrt(32)
    else:
        assert values.abs().max() <= 1 / math.sqrt(32)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_oa_gate_lr_scale_puts_gates_and_thresholds_in_their_own_group(scale):
    method = attached("oa_adapter", gate_lr_scale=scale)
    method.begin_task(FIRST)
    groups = method.parameter_groups(0.1, None)
    gate_ids = {id(p) for branch in method.current_branches().values() for p in (branch.gate, branch.threshold)}
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert gate_ids <= set(lr_of)
    assert [lr_of[i] for i in gate_ids] == pytest.approx([0.1 * scale] * len(gate_ids))
    up_ids = {id(branch.up) for branch in method.current_branches().values()}
    assert [lr_of[i] for i in up_ids] == pytest.approx([0.1] * len(up_ids))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_oa_dropout_makes_training_forwards_stochastic(dropout):
    method = attached("oa_adapter", dropout=dropout)
    method.begin_task(FIRST)
    with torch.no_grad():
        for index, branch in enumerate(method.current_branches().values()):
            branch.up.copy_(seeded(*branch.up.shape, seed=index, scale=3.0))
    inputs = text_batch(method, FIRST)["inputs"]
    method.model.train_adapters()
    torch.manual_seed(0)
    first, second = method.model.features(inputs), method.model.features(inputs)
    assert torch.equal(first, second) is (dropout == 0.0)
    method.model.eval()
    assert torch.equal(method.model.features(inputs), method.model.features(inputs))


# ===== LoRAC-IPC =======================================================================================
@pytest.mark.parametrize("weight", [0.0, 0.25, 2.0])
def test_lorac_ipc_ortho_weight_scales_the_orthogonality_loss(weight):
    """A_1 = 2 [e_1..e_r] in every slot: A^T A - I = 3 I, so ||.||_F = 3 sqrt(r) per slot."""
    method = attached("lorac_ipc", rank=4, ortho_weight=weight)
    method.begin_task(FIRST)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.factors_A[0].copy_(2.0 * torch.eye(layer.fan_in, 4))
    slots = len(method.layers)
    assert slots == 12 and method.orthogonality_loss().item() == pytest.approx(slots * 3 * math.sqrt(4), rel=1e-6)
    extra = method.extra_loss(None, None)
    if weight == 0:
        assert extra is None
    else:
        assert extra.item() == pytest.approx(weight * slots * 3 * math.sqrt(4), rel=1e-6)


# ===== FM-LoRA =========================================================================================
def fm(**options):
    """fm_lora at rank 4 on tiny-bert (query and value of two blocks: four layers), small complexity sample."""
    return attached("fm_lora", **{"rank": 4, "prompt_len": 0, "complexity_samples": 8, **options})


@pytest.mark.parametrize("weights, part", [((1.0, 0.0), "h_spec"), ((0.0, 1.0), "h_sim")])
def test_fm_complexity_weights_select_the_spectral_or_the_similarity_part(weights, part):
    method = fm(spectral_weight=weights[0], similarity_weight=weights[1])
    method.measure_task(FIRST)
    measured = method.measure_task(SECOND)  # the second task: its novelty against the first is below 1
    assert 0.0 < measured["h_sim"] < 1.0 and 0.0 < measured["h_spec"] < 1.0
    assert abs(measured["h_spec"] - measured["h_sim"]) > 1e-3
    assert measured["H"] == pytest.approx(measured[part], abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_fm_drs_beta_zero_leaves_only_the_zero_bias_in_the_selector_logits(beta):
    method = fm(drs_beta=beta)
    method.begin_task(FIRST)
    method.prepare_task(FIRST, [])
    logits = method.selector_logits()
    assert logits.shape == (1, 4) and torch.equal(method.state.drs_bias, torch.zeros(4))
    assert torch.equal(logits, torch.zeros_like(logits)) is (beta == 0.0)


def fm_second_task(**options):
    """drs off, no prompt: task 0 finished with its cores untouched (M_0 = I kept), task 1 begun."""
    method = fm(drs="off", **options)
    method.begin_task(FIRST)
    method.prepare_task(FIRST, [])
    with torch.no_grad():
        for index, layer in enumerate(method.layers.values()):
            layer.core_N.copy_(seeded(4, 4, seed=index))
    method.end_task(FIRST, [])
    method.begin_task(SECOND)
    method.prepare_task(SECOND, [])
    return method


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_fm_core_orth_weight_adds_the_weighted_core_overlap(weight):
    """Live M = 2I against the kept M_0 = I under a full mask: ||2I I^T||_F^2 = 4r = 16 per layer, four layers."""
    method = fm_second_task(core_orth_weight=weight)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.core_M.copy_(2.0 * torch.eye(4))
    method.forward(text_batch(method, SECOND))  # hands every layer this step's (full) rank mask
    extra = method.extra_loss(None, None)
    if weight == 0.0:
        assert extra is None
    else:
        assert extra.item() == pytest.approx(weight * 16 * 4, rel=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_fm_keep_task_cores_false_keeps_no_per_task_cores(keep):
    method = fm(drs="off", keep_task_cores=keep)
    method.begin_task(FIRST)
    method.prepare_task(FIRST, [])
    with torch.no_grad():
        for index, layer in enumerate(method.layers.values()):
            layer.core_N.copy_(seeded(4, 4, seed=index))
    method.end_task(FIRST, [])
    for index, layer in enumerate(method.layers.values()):
        kept = dict(layer.kept_cores.named_buffers())
        assert (sorted(kept) == ["M_0", "N_0"]) is keep and (len(kept) == 0) is (not keep)
        assert torch.allclose(layer.accumulated_core, seeded(4, 4, seed=index))  # folded either way: K = N_0 I
    assert method.trained_task_names == (["0"] if keep else [])


@pytest.mark.parametrize("mode, rows", [("svd", slice(0, 4)), ("svd_minor", slice(28, 32))])
def test_fm_shared_basis_svd_spans_the_top_or_bottom_singular_subspace(mode, rows):
    method = fm(shared_basis=mode)
    for layer in method.layers.values():
        left, _, right_t = torch.linalg.svd(layer.base_layer.weight.detach().double())
        down, up = layer.shared_A.double(), layer.shared_B.double()
        assert torch.allclose(down @ down.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
        others = [index for index in range(32) if index not in range(32)[rows]]
        assert (down @ right_t[others].T).abs().max() < 1e-5  # orthogonal to the other singular directions
        assert (left[:, others].T @ up).abs().max() < 1e-5
        assert (down @ right_t[rows].T).abs().max() > 0.1


def test_fm_random_orthogonal_bases_are_seeded_orthonormal_and_not_the_svd_ones():
    first, again, svd = fm(shared_basis="random_orthogonal"), fm(shared_basis="random_orthogonal"), fm()
    other_seed = attached("fm_lora", seed=1, rank=4, prompt_len=0, shared_basis="random_orthogonal")
    for name, layer in first.layers.items():
        assert torch.allclose(layer.shared_A @ layer.shared_A.T, torch.eye(4), atol=1e-5)
        assert torch.allclose(layer.shared_B.T @ layer.shared_B, torch.eye(4), atol=1e-5)
        assert torch.equal(layer.shared_A, again.layers[name].shared_A) and torch.equal(layer.shared_B, again.layers[name].shared_B)
        assert not torch.allclose(layer.shared_A, other_seed.layers[name].shared_A, atol=1e-3)
        # not the SVD bases: a subspace overlap ||A_rand A_svd^T||_F^2 / r well below 1
        assert (layer.shared_A @ svd.layers[name].shared_A.T).pow(2).sum().item() / 4 < 0.9


def test_fm_candidate_ranks_restrict_the_sampled_masks():
    method = fm(candidate_ranks=[1, 4], tau_start=5.0, tau_min=5.0)
    assert method.candidate_ranks == [1, 4] and method.state.drs_bias.shape == (2,)
    method.begin_task(FIRST)
    method.prepare_task(FIRST, [])
    method.total_steps = 100
    method.model.train()
    sizes = {int(method.sample_mask().sum()) for _ in range(40)}
    assert sizes == {1, 4}


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, [1.0, 0.1**0.4, 0.1**0.8, 0.1]),  # defaults: 1 -> 0.1 geometrically over half of the 10 steps
        ({"tau_start": 2.0, "tau_min": 0.5, "anneal_fraction": 0.4}, [2.0, 1.0, 0.5, 0.5]),
    ],
)
def test_fm_temperature_schedule_follows_its_knobs(options, expected):
    method = fm(**options)
    method.total_steps = 10
    assert [method.temperature(step) for step in (0, 2, 4, 9)] == pytest.approx(expected)


@pytest.mark.parametrize("commit_fraction, first_commit_step", [(0.1, 9), (0.3, 7)])
def test_fm_commit_fraction_sets_where_the_commit_phase_starts(commit_fraction, first_commit_step):
    method = fm(commit_fraction=commit_fraction)
    method.total_steps = 10
    phases = []
    for step in range(10):
        method.step = step
        phases.append(method.in_commit_phase())
    assert phases == [step >= first_commit_step for step in range(10)]


@pytest.mark.parametrize("multiplier", [10.0, 3.0])
def test_fm_drs_lr_multiplier_sets_the_selector_bias_learning_rate(multiplier):
    method = fm(drs_lr_multiplier=multiplier)
    method.begin_task(FIRST)
    method.prepare_task(FIRST, [])
    [group] = [group for group in method.parameter_groups(0.01, None) if any(p is method.state.drs_bias for p in group["params"])]
    assert len(group["params"]) == 1 and group["lr"] == pytest.approx(0.01 * multiplier)


@pytest.mark.parametrize("head_init", ["zero", "uniform"])
def test_fm_head_init_uniform_keeps_the_new_rows_random(head_init):
    method = fm(head_init=head_init)
    method.begin_task(FIRST)
    rows = method.model.head.weights[0]
    bound = 1.0 / 32**0.5
    if head_init == "zero":
        assert torch.equal(rows, torch.zeros_like(rows))
    else:
        assert rows.abs().min() > 0 and rows.abs().max() <= bound


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_fm_prompt_anchor_weight_pulls_the_prompt_towards_its_last_value(weight):
    """The prompt moved by 0.1 in each of its L_p x d = 2 x 32 entries since task 0: anchor loss w * 64 * 0.01."""
    method = fm_second_task(prompt_len=2, prompt_anchor_weight=weight)
    with torch.no_grad():
        method.state.prompt.prompts.add_(0.1)
    extra = method.extra_loss(None, None)
    if weight == 0.0:
        assert extra is None
    else:
        assert extra.item() == pytest.approx(weight * 64 * 0.01, rel=1e-4)


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_fm_prompt_init_std_sets_the_prompts_spread(std):
    prompts = fm(prompt_len=8, prompt_init_std=std).state.prompt.prompts
    assert prompts.numel() == 8 * 32 and prompts.std().item() == pytest.approx(std, rel=0.15)


# ===== SD-LoRA =========================================================================================
@pytest.mark.parametrize("magnitude_init", [0.8, 0.5])
def test_sd_lora_magnitude_init_sets_every_new_magnitude(magnitude_init):
    method = attached("sd_lora", rank=2, magnitude_init=magnitude_init)
    method.begin_task(FIRST)
    assert method.magnitude_values() == {"task_0": pytest.approx(magnitude_init)}
    with torch.no_grad():
        method.magnitudes["task_0"].fill_(2.0)  # trained away; the next task resets it (reset_magnitudes)
    method.begin_task(SECOND)
    assert method.magnitude_values() == {"task_0": pytest.approx(magnitude_init), "task_1": pytest.approx(magnitude_init)}


# ===== shared LoRA options (seq_lora, inc_lora, o_lora) ================================================
LORA_METHODS = ["seq_lora", "inc_lora", "o_lora"]


def lora_branches(method) -> list:
    return [branch for layer in method.layers.values() for branch in layer.branches.values()]


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_gaussian_init_draws_a_with_std_one_over_r(name):
    """Rank 2: N(0, 1/r^2) has std 0.5; Kaiming-uniform on fan-in 32 stays within 1/sqrt(32) ~ 0.18."""
    bound = 1.0 / math.sqrt(32)
    for init in ("kaiming", "gaussian"):
        method = attached(name, rank=2, init=init)
        method.begin_task(FIRST)
        values = torch.cat([branch.lora_A.detach().flatten() for branch in lora_branches(method)])
        assert values.numel() == 4 * 2 * 32
        if init == "gaussian":
            assert values.std().item() == pytest.approx(0.5, rel=0.15) and values.abs().max() > 2 * bound
        else:
            assert values.abs().max() <= bound


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_use_rslora_scales_each_branch_by_alpha_over_sqrt_r(name):
    outputs = {}
    for rslora in (False, True):
        method = attached(name, rank=4, alpha=32.0, use_rslora=rslora)
        method.begin_task(FIRST)
        branch = lora_branches(method)[0]
        assert branch.scaling == (16.0 if rslora else 8.0)
        with torch.no_grad():
            branch.lora_B.copy_(seeded(*branch.lora_B.shape, seed=1))
        branch.eval()
        outputs[rslora] = branch(seeded(3, 32, seed=2)).detach()
    assert outputs[False].abs().max() > 0
    assert torch.allclose(outputs[True], 2.0 * outputs[False], atol=1e-6)  # sqrt(r) = 2 times the alpha / r output


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_target_modules_query_adapts_only_the_query_projections(name):
    query_only = attached(name, target_modules=["query"])
    default = attached(name)
    assert sorted(query_only.layers) == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    assert len(default.layers) == 4 and any(site.endswith("value") for site in default.layers)


def two_class_router(name, **options):
    method = attached(name, routed_inference=True, **options)
    features = torch.cat([seeded(10, 32, seed=5, scale=0.1) + 3.0 * torch.eye(32)[0], seeded(10, 32, seed=6, scale=0.1)
                          + 3.0 * torch.eye(32)[1]])
    labels = torch.tensor([0] * 10 + [1] * 10)
    method.router.record_task(0, [0, 1], [(features, labels)])
    return method.router, features


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_router_cosine_scores_by_cosine_similarity_to_the_class_means(name):
    router, features = two_class_router(name, router="cosine")
    assert router.metric == "cosine"
    at_means = torch.nn.functional.normalize(router.means.means(), dim=-1)
    scores = router.slot_scores(at_means)  # a slot's own mean direction: cosine 1
    assert torch.allclose(scores.diagonal(), torch.ones(2), atol=1e-5)
    mahalanobis, _ = two_class_router(name)  # minus a squared distance: never positive
    assert mahalanobis.metric == "mahalanobis" and (mahalanobis.slot_scores(at_means) <= 0).all()


@pytest.mark.parametrize("name", LORA_METHODS)
def test_lora_router_shrinkage_one_makes_the_precision_a_multiple_of_identity(name):
    full, _ = two_class_router(name, router_shrinkage=1.0)
    assert full.shrinkage == 1.0
    precision = full.precision()
    assert torch.allclose(precision, precision[0, 0] * torch.eye(32), atol=1e-4 * precision[0, 0].item())
    default, _ = two_class_router(name)
    other = default.precision()
    assert not torch.allclose(other, other[0, 0] * torch.eye(32), atol=1e-2 * other[0, 0].item())
