"""FM-LoRA options: each option, set away from its default, changes what it should (hand-set inputs, literal expectations)."""

from __future__ import annotations

import pytest
import torch
from helpers import attached, seeded, text_batch

from loracl.data.stream import Task
from loracl.methods.fm_lora import FmLora


def fm(**options: object) -> FmLora:
    """fm_lora at rank 4 on tiny-bert (query and value of two blocks: four layers), no prompt, small complexity sample."""
    return attached("fm_lora", **{"rank": 4, "prompt_len": 0, "complexity_samples": 8, **options})


def fm_first_task(first: Task, **options: object) -> FmLora:
    """drs off, no prompt: task 0 finished with hand-set cores N (M_0 = I)."""
    method = fm(drs="off", **options)
    method.begin_task(first)
    method.prepare_task(first, [])
    with torch.no_grad():
        for index, layer in enumerate(method.layers.values()):
            layer.core_N.copy_(seeded(4, 4, seed=index))
    method.end_task(first, [])
    return method


def fm_second_task(first: Task, second: Task, **options: object) -> FmLora:
    """fm_first_task (M_0 = I kept), then task 1 begun and prepared."""
    method = fm_first_task(first, **options)
    method.begin_task(second)
    method.prepare_task(second, [])
    return method


@pytest.mark.parametrize("weights, part", [((1.0, 0.0), "h_spec"), ((0.0, 1.0), "h_sim")])
def test_fm_complexity_weights_select_the_spectral_or_the_similarity_part(weights, part, first, second):
    method = fm(spectral_weight=weights[0], similarity_weight=weights[1])
    method.measure_task(first)
    measured = method.measure_task(second)  # the second task: its novelty against the first is below 1
    assert 0.0 < measured["h_sim"] < 1.0 and 0.0 < measured["h_spec"] < 1.0
    assert abs(measured["h_spec"] - measured["h_sim"]) > 1e-3
    assert measured["H"] == pytest.approx(measured[part], abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_fm_drs_beta_zero_leaves_only_the_zero_bias_in_the_selector_logits(beta, first):
    method = fm(drs_beta=beta)
    method.begin_task(first)
    method.prepare_task(first, [])
    logits = method.selector_logits()
    assert logits.shape == (1, 4) and torch.equal(method.state.drs_bias, torch.zeros(4))
    assert torch.equal(logits, torch.zeros_like(logits)) is (beta == 0.0)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_fm_core_orth_weight_adds_the_weighted_core_overlap(weight, first, second):
    """Live M = 2I against the kept M_0 = I under a full mask: ||2I I^T||_F^2 = 4r = 16 per layer, four layers."""
    method = fm_second_task(first, second, core_orth_weight=weight)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.core_M.copy_(2.0 * torch.eye(4))
    method.forward(text_batch(method, second))  # hands every layer this step's (full) rank mask
    extra = method.extra_loss(None, None)
    if weight == 0.0:
        assert extra is None
    else:
        assert extra.item() == pytest.approx(weight * 16 * 4, rel=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_fm_keep_task_cores_false_keeps_no_per_task_cores(keep, first):
    method = fm_first_task(first, keep_task_cores=keep)
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
    drawn, again, svd = fm(shared_basis="random_orthogonal"), fm(shared_basis="random_orthogonal"), fm()
    other_seed = attached("fm_lora", seed=1, rank=4, prompt_len=0, shared_basis="random_orthogonal")
    for name, layer in drawn.layers.items():
        assert torch.allclose(layer.shared_A @ layer.shared_A.T, torch.eye(4), atol=1e-5)
        assert torch.allclose(layer.shared_B.T @ layer.shared_B, torch.eye(4), atol=1e-5)
        assert torch.equal(layer.shared_A, again.layers[name].shared_A) and torch.equal(layer.shared_B, again.layers[name].shared_B)
        assert not torch.allclose(layer.shared_A, other_seed.layers[name].shared_A, atol=1e-3)
        # not the SVD bases: a subspace overlap ||A_rand A_svd^T||_F^2 / r well below 1
        assert (layer.shared_A @ svd.layers[name].shared_A.T).pow(2).sum().item() / 4 < 0.9


def test_fm_candidate_ranks_restrict_the_sampled_masks(first):
    method = fm(candidate_ranks=[1, 4], tau_start=5.0, tau_min=5.0)
    assert method.candidate_ranks == [1, 4] and method.state.drs_bias.shape == (2,)
    method.begin_task(first)
    method.prepare_task(first, [])
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
def test_fm_drs_lr_multiplier_sets_the_selector_bias_learning_rate(multiplier, first):
    method = fm(drs_lr_multiplier=multiplier)
    method.begin_task(first)
    method.prepare_task(first, [])
    [group] = [group for group in method.parameter_groups(0.01, None) if any(p is method.state.drs_bias for p in group["params"])]
    assert len(group["params"]) == 1 and group["lr"] == pytest.approx(0.01 * multiplier)


@pytest.mark.parametrize("head_init", ["zero", "uniform"])
def test_fm_head_init_uniform_keeps_the_new_rows_random(head_init, first):
    method = fm(head_init=head_init)
    method.begin_task(first)
    rows = method.model.head.weights[0]
    bound = 1.0 / 32**0.5
    if head_init == "zero":
        assert torch.equal(rows, torch.zeros_like(rows))
    else:
        assert rows.abs().min() > 0 and rows.abs().max() <= bound


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_fm_prompt_anchor_weight_pulls_the_prompt_towards_its_last_value(weight, first, second):
    """The prompt moved by 0.1 in each of its L_p x d = 2 x 32 entries since task 0: anchor loss w * 64 * 0.01."""
    method = fm_second_task(first, second, prompt_len=2, prompt_anchor_weight=weight)
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
