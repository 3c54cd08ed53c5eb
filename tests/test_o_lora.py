"""O-LoRA (baselines.md 1.9): identity at task start, the penalty against brute force, frozen old pairs, merge."""

import pytest
import torch
from helpers import synthetic_text_tasks, tiny_config, tiny_text_stream

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
    model = ContinualClassifier(backbone)
    method = create_method("o_lora", options, MethodContext(HeadConfig(), TrainConfig(), seed=0, num_tasks=3))
    method.attach(model)
    stream = build_stream(synthetic_text_tasks(3, train=8, test=4), scenario="class_incremental")
    batch = {"inputs": backbone.collate(stream.tasks[0].train.inputs), "labels": torch.tensor(stream.tasks[0].train.labels)}
    return method, model, stream, batch


def randomize_current(method, scale=0.1):
    with torch.no_grad():
        for layer in method.layers.values():
            branch = layer.branches[method.current_branch]
            branch.lora_A.normal_(0, scale)
            branch.lora_B.normal_(0, scale)


def test_output_unchanged_at_each_task_start():
    method, model, stream, batch = build()
    model.eval()
    for task in stream.tasks:
        before = model.features(batch["inputs"]) if task.index else None
        method.begin_task(task)
        if before is not None:
            assert torch.equal(model.features(batch["inputs"]), before)
        randomize_current(method)


def test_orthogonality_penalty_matches_brute_force():
    method, model, stream, _ = build(lambda_orth=1.0)
    method.begin_task(stream.tasks[0])
    assert method.orthogonality_penalty() is None  # t = 1: no earlier pairs
    randomize_current(method)
    method.begin_task(stream.tasks[1])
    randomize_current(method)
    method.begin_task(stream.tasks[2])
    randomize_current(method)
    brute_abs, brute_sq, entries = 0.0, 0.0, 0
    for layer in method.layers.values():
        new = layer.branches["task_2"].lora_A.tolist()
        for old_name in ("task_0", "task_1"):
            old = layer.branches[old_name].lora_A.tolist()
            for old_row in old:
                for new_row in new:
                    value = sum(a * b for a, b in zip(old_row, new_row))
                    brute_abs += abs(value)
                    brute_sq += value**2
                    entries += 1
    assert method._old_down[next(iter(method.layers))].shape == (2 * 8, 32)  # (t-1) r x d_in
    assert method.orthogonality_penalty().item() == pytest.approx(brute_abs, rel=1e-5)
    method.options.orth_penalty = "squared"
    assert method.orthogonality_penalty().item() == pytest.approx(brute_sq, rel=1e-5)
    method.options.orth_reduction = "mean"
    assert method.orthogonality_penalty().item() == pytest.approx(brute_sq / entries, rel=1e-5)


def test_penalty_gradient_is_sign_overlap_times_old_rows():
    method, model, stream, batch = build(lambda_orth=1.0, lambda_l2=0.0)
    method.begin_task(stream.tasks[0])
    randomize_current(method)
    method.begin_task(stream.tasks[1])
    randomize_current(method)
    method.extra_loss(batch, None).backward()
    for _name, layer in method.layers.items():
        old = layer.branches["task_0"].lora_A.detach()
        new = layer.branches["task_1"].lora_A
        expected = torch.sign(old @ new.detach().T).T @ old
        assert torch.allclose(new.grad, expected, atol=1e-6)


def test_l2_term_is_plain_frobenius_norms():
    """The new pair's A [8, 32] all 0.5 and B [32, 8] all 0.25: ||A||_F = sqrt(256 * 0.25) = 8, ||B||_F = 4, so
    12 per layer, 48 over the 4 adapted layers, times lambda_l2 0.3 = 14.4 (squared norms would give 0.3 * 320).
    The old pair, set to 1.0, does not count."""
    method, model, stream, batch = build(lambda_orth=0.0, lambda_l2=0.3)
    method.begin_task(stream.tasks[0])
    method.begin_task(stream.tasks[1])
    assert len(method.layers) == 4
    with torch.no_grad():
        for layer in method.layers.values():
            new, old = layer.branches["task_1"], layer.branches["task_0"]
            assert new.lora_A.shape == (8, 32) and new.lora_B.shape == (32, 8)
            new.lora_A.fill_(0.5)
            new.lora_B.fill_(0.25)
            old.lora_A.fill_(1.0)
            old.lora_B.fill_(1.0)
    assert method.extra_loss(batch, None).item() == pytest.approx(14.4, rel=1e-6)


def test_old_pairs_and_base_bit_identical_after_a_step_and_merge_equivalence():
    method, model, stream, batch = build(lambda_orth=0.5, lambda_l2=0.1)
    method.begin_task(stream.tasks[0])
    randomize_current(method)
    method.begin_task(stream.tasks[1])
    frozen = {key: value.clone() for key, value in model.state_dict().items() if "task_0" in key or "base_layer" in key}
    parameters = method.trainable_parameters()
    per_layer = sum(8 * (layer.in_features + layer.out_features) for layer in method.layers.values())
    head = len(stream.tasks[1].class_ids) * (32 + 1)
    assert sum(p.numel() for p in parameters) == per_layer + head
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    model.train()
    logits = method.forward(batch)
    batch["labels"] = torch.tensor(stream.tasks[1].train.labels)
    (method.task_loss(logits, batch) + method.extra_loss(batch, logits)).backward()
    optimizer.step()
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert all(layer.branches["task_1"].lora_B.abs().sum() > 0 for layer in method.layers.values())  # the new pair trained
    model.eval()
    unmerged = model.features(batch["inputs"])
    for layer in method.layers.values():
        layer.merge()
    merged = model.features(batch["inputs"])
    assert torch.allclose(merged, unmerged, atol=1e-5)
    for layer in method.layers.values():
        layer.unmerge()


def test_zero_penalties_equal_inc_lora_weights(tmp_path):
    stream = tiny_text_stream(2, train=8, test=4)
    [inc] = run_experiment(tiny_config("inc_lora"), None, stream=stream)
    [olora] = run_experiment(
        tiny_config({"name": "o_lora", "lambda_orth": 0.0, "lambda_l2": 0.0}), None, stream=stream
    )  # both at their defaults: alpha 32, one shared dropout mask of 0.1 (spec 2.1: identical weights)
    inc_state, olora_state = inc.method.state_dict(), olora.method.state_dict()
    assert inc_state.keys() == olora_state.keys()
    assert all(torch.equal(inc_state[key], olora_state[key]) for key in inc_state)


def test_end_to_end_penalty_reduces_overlap_and_resumes(tmp_path):
    stream = tiny_text_stream(2, train=16, test=8)
    [free] = run_experiment(tiny_config({"name": "o_lora", "lambda_orth": 0.0}), None, stream=stream)
    [penalised] = run_experiment(tiny_config({"name": "o_lora", "lambda_orth": 5.0}), tmp_path, stream=stream)
    assert penalised.results["method_metrics"]["final_orth_overlap_l1"] < free.results["method_metrics"]["final_orth_overlap_l1"]
    assert len(penalised.accuracy_matrix) == 2
    [again] = run_experiment(tiny_config({"name": "o_lora", "lambda_orth": 5.0}), tmp_path, stream=stream)  # resumes
    assert again.accuracy_matrix == penalised.accuracy_matrix
    assert again.results["method_metrics"] == pytest.approx(penalised.results["method_metrics"])
    state, reloaded = penalised.method.state_dict(), again.method.state_dict()
    assert all(torch.equal(state[key], reloaded[key]) for key in state)
    # storage (spec 1.9): per task r (d_in + d_out) floats per adapted map, plus the task's head rows (d + 1 each)
    sites, rank, hidden = len(penalised.method.layers), 8, 32
    per_task = [4 * (sites * rank * (hidden + hidden) + (hidden + 1) * len(task.class_ids)) for task in stream.tasks]
    assert penalised.results["stored_bytes_per_task"] == per_task


@pytest.mark.parametrize(
    "key,value",
    [("rank", 0), ("lambda_orth", -1.0), ("lambda_l2", -0.1), ("orth_penalty", "cube"), ("orth_reduction", "max"), ("dropout", 1.0), ("bogus", 1)],
)
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        validate_config({"backbone": {"name": "tiny-bert"}, "method": {"name": "o_lora", key: value}})
