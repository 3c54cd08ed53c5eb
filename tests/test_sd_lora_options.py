"""SD-LoRA options: each option, set away from its default, changes what it should (hand-set inputs, literal expectations)."""

from __future__ import annotations

import pytest
import torch
from helpers import attached


@pytest.mark.parametrize("magnitude_init", [0.8, 0.5])
def test_sd_lora_magnitude_init_sets_every_new_magnitude(magnitude_init, tasks):
    first, second = tasks
    method = attached("sd_lora", rank=2, magnitude_init=magnitude_init)
    method.begin_task(first)
    assert method.magnitude_values() == {"task_0": pytest.approx(magnitude_init)}
    with torch.no_grad():
        method.magnitudes["task_0"].fill_(2.0)  # trained away; the next task resets it (reset_magnitudes)
    method.begin_task(second)
    assert method.magnitude_values() == {"task_0": pytest.approx(magnitude_init), "task_1": pytest.approx(magnitude_init)}
