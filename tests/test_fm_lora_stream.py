"""fm_lora through the real engine: tiny streams, stored ranks, freezing, storage formula, resume, ViT."""

import json
import shutil

import pytest
import torch
from helpers import tiny_config, tiny_digits_stream, tiny_text_stream
from safetensors.torch import load_file

from loracl.engine import run_experiment
from loracl.engine.checkpoint import STATE_FILE

OPTIONS = {"name": "fm_lora", "rank": 4, "prompt_len": 2, "complexity_samples": 16}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm_text")
    [result] = run_experiment(tiny_config(OPTIONS), out, stream=tiny_text_stream(3))
    return out, result


def test_text_stream_records_ranks_and_reports(text_run):
    out, result = text_run
    results = result.results
    assert len(results["accuracy_matrix"]) == 3
    ranks = [record["method_state"]["chosen_ranks"] for record in results["per_task"]]
    final = ranks[-1]
    assert ranks == [final[:1], final[:2], final]  # r_t is committed once, at the end of task t, and kept
    assert list(results["method_metrics"]["chosen_ranks"].values()) == final
    # the recorded r_t is the rank the task was folded with: its kept cores are trimmed to r_t directions
    # (N_t [r, r_t], M_t [r_t, r]) and the served core K is exactly the sum of the kept N_t M_t
    method = result.method
    assert method.trained_task_names == ["0", "1", "2"]
    for layer in method.layers.values():
        for key, rank in zip(method.trained_task_names, final):
            assert tuple(getattr(layer.kept_cores, f"N_{key}").shape) == (4, rank)
            assert tuple(getattr(layer.kept_cores, f"M_{key}").shape) == (rank, 4)
        kept = sum(layer.kept_task_core(key) for key in method.trained_task_names)
        torch.testing.assert_close(layer.accumulated_core, kept, atol=1e-6, rtol=1e-5)
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["method_metrics"]["chosen_ranks"] == results["method_metrics"]["chosen_ranks"]


def test_earlier_cores_bases_and_head_rows_stay_frozen(text_run):
    out, result = text_run
    after_first = load_file(str(out / "fm_lora" / "checkpoints" / "task_0" / STATE_FILE))
    final = result.method.state_dict()
    frozen = [key for key in after_first if "kept_cores" in key or "shared_" in key or key.startswith("head.")]
    assert any("kept_cores" in key for key in frozen) and any("shared_A" in key for key in frozen)
    for key in frozen:
        assert torch.equal(after_first[key], final[key].cpu()), key
    changed = [key for key in after_first if key.endswith("accumulated_core")]
    assert changed and any(not torch.equal(after_first[key], final[key].cpu()) for key in changed)


def test_stored_bytes_per_task_follow_the_formula(text_run):
    _, result = text_run
    method = result.method
    hidden = method.model.backbone.hidden_size
    for record, size, task_rank in zip(result.results["per_task"][1:], result.results["stored_bytes_per_task"][1:], method.chosen_ranks[1:]):
        classes = 2
        expected = 4 * (len(method.layers) * 2 * 4 * task_rank + hidden * 8 + (hidden + 1) * classes)
        assert size == expected, record["task"]
    trainable = result.results["trainable_params_per_task"]
    assert trainable[0] == len(method.layers) * 2 * 16 + 2 * hidden + 4 + (hidden + 1) * 2


def test_resume_gives_the_same_results(text_run, tmp_path):
    out, result = text_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "fm_lora" / "checkpoints" / "task_2")
    [resumed] = run_experiment(tiny_config(OPTIONS), copy, stream=tiny_text_stream(3))
    assert resumed.accuracy_matrix == result.accuracy_matrix
    assert resumed.method.chosen_ranks == result.method.chosen_ranks
    original, again = result.method.state_dict(), resumed.method.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[key].cpu(), again[key].cpu()) for key in original)


def test_predict_needs_no_task_id_and_merge_keeps_predictions(text_run):
    _, result = text_run
    method = result.method
    stream = tiny_text_stream(3)
    device = next(method.model.parameters()).device
    inputs = {key: value.to(device) for key, value in method.model.backbone.collate(stream.tasks[0].test.inputs[:6]).items()}
    scores = method.predict({"inputs": inputs})
    assert scores.shape == (6, method.model.head.num_classes)
    for layer in method.layers.values():
        layer.merge()
    assert torch.allclose(method.predict({"inputs": inputs}), scores, atol=1e-5)
    for layer in method.layers.values():
        layer.unmerge()


def test_digits_vit_with_base_session_and_learned_bases(tmp_path):
    config = tiny_config(
        {**OPTIONS, "shared_basis": "learn_first_task"}, backbone="tiny-vit", train={"base_session_epochs": 1, "epochs": 1}
    )
    [result] = run_experiment(config, tmp_path, stream=tiny_digits_stream(3, max_train=24, max_test=12))
    ranks = result.results["method_metrics"]["chosen_ranks"]
    assert len(ranks) == 2 and list(ranks.values())[0] == 4  # DRS is off while the bases learn
    assert result.results["method_metrics"]["adapted_layers"] == 4  # q and v of 2 blocks
    assert all(not layer.shared_A.requires_grad for layer in result.method.layers.values())


def test_single_core_per_layer_ranks_and_deep_prompt_end_to_end_with_resume(tmp_path):
    options = {**OPTIONS, "core_form": "single", "drs_granularity": "per_layer", "prompt_depth": "deep", "prompt_layers": 2}
    out = tmp_path / "run"
    [result] = run_experiment(tiny_config(options), out, stream=tiny_text_stream(3))
    method = result.method
    ranks = result.results["method_metrics"]["chosen_ranks"]
    assert len(ranks) == 3 and all(set(per_layer) == set(method.layers) for per_layer in ranks.values())
    hidden = method.model.backbone.hidden_size
    for size, per_layer in zip(result.results["stored_bytes_per_task"][1:], method.chosen_ranks[1:]):
        assert size == 4 * (sum(4 * rank for rank in per_layer) + hidden * 8 + (hidden + 1) * 2)  # N_t [r, r_t] only
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "fm_lora" / "checkpoints" / "task_2")
    [resumed] = run_experiment(tiny_config(options), copy, stream=tiny_text_stream(3))
    assert resumed.accuracy_matrix == result.accuracy_matrix
    assert resumed.method.chosen_ranks == method.chosen_ranks
    original, again = method.state_dict(), resumed.method.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[key].cpu(), again[key].cpu()) for key in original)
