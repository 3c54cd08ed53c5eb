"""Ablation switches that isolate a method's own mechanism: each one changes what it says it changes."""

from __future__ import annotations

import torch
from helpers import tiny_config, tiny_text_stream

from loracl.engine import run_experiment


def test_sd_lora_frozen_magnitudes_stay_at_their_start_and_never_train():
    stream = tiny_text_stream(2)
    [frozen] = run_experiment(tiny_config({"name": "sd_lora", "train_magnitudes": False}), None, stream=stream)
    [learned] = run_experiment(tiny_config({"name": "sd_lora"}), None, stream=stream)
    for name, magnitude in frozen.method.magnitudes.items():
        assert not magnitude.requires_grad and float(magnitude) == torch.tensor(frozen.method.options.magnitude_init).item(), name
    assert float(learned.method.magnitudes["task_1"]) != learned.method.options.magnitude_init


def test_inflora_random_design_gives_a_seeded_orthonormal_a_not_the_designed_one():
    stream = tiny_text_stream(2)
    [random] = run_experiment(tiny_config({"name": "inflora", "design": "random"}), None, stream=stream)
    [designed] = run_experiment(tiny_config({"name": "inflora"}), None, stream=stream)
    for name, layer in random.method.layers.items():
        down = layer.branches["task_1"].lora_A
        gram = down @ down.T * 3.0  # rows orthonormal / sqrt(3)
        assert torch.allclose(gram, torch.eye(len(down)), atol=1e-5), name
        assert not torch.allclose(down, designed.method.layers[name].branches["task_1"].lora_A, atol=1e-3), name
    [again] = run_experiment(tiny_config({"name": "inflora", "design": "random"}), None, stream=stream)
    for name, layer in again.method.layers.items():
        assert torch.equal(layer.branches["task_1"].lora_A, random.method.layers[name].branches["task_1"].lora_A)
