"""bf16 autocast through accelerate on CPU: the training step runs under autocast, adapters stay float32."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_text_stream

import loracl.engine.runner as runner_module
from loracl.engine import run_experiment


@pytest.mark.parametrize("method", ["inc_lora", "lorac_ipc", "metalora"])
def test_bf16_autocast_runs_the_step_in_bf16_and_keeps_adapters_float32(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bool, torch.dtype]] = []
    original = runner_module.TrainingStep.forward

    def recording(self, batch):  # noqa: ANN001, ANN202 - TrainingStep.forward's signature
        loss, total = original(self, batch)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return loss, total

    monkeypatch.setattr(runner_module.TrainingStep, "forward", recording)
    [result] = run_experiment(tiny_config(method, train={"mixed_precision": "bf16"}), stream=tiny_text_stream(2, train=8, test=4))
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    trainable = [tensor for key, tensor in result.method.state_dict().items() if tensor.is_floating_point()]
    assert trainable and all(tensor.dtype in (torch.float32, torch.float64) for tensor in trainable)
