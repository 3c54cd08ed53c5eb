"""LoRAC-IPC options: each option, set away from its default, changes what it should (hand-set inputs, literal expectations)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import attached


@pytest.mark.parametrize("weight", [0.0, 0.25, 2.0])
def test_lorac_ipc_ortho_weight_scales_the_orthogonality_loss(weight, first):
    """A_1 = 2 [e_1..e_r] in every slot: A^T A - I = 3 I, so ||.||_F = 3 sqrt(r) per slot."""
    method = attached("lorac_ipc", rank=4, ortho_weight=weight)
    method.begin_task(first)
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
