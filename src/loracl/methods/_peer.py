"""Small helpers shared by the peer baselines (o_lora, inflora, sd_lora): which projections they adapt."""

from __future__ import annotations

from torch import nn

# The attention projections each official code adapts, under the names different Hugging Face models use.
QUERY_VALUE_NAMES = (["query", "value"], ["q_proj", "v_proj"], ["q", "v"])
KEY_VALUE_NAMES = (["key", "value"], ["k_proj", "v_proj"], ["k", "v"])


def resolve_projection_targets(
    model: nn.Module, target_modules: str | list[str], candidates: tuple[list[str], ...] = QUERY_VALUE_NAMES
) -> str | list[str]:
    """`auto`: the first candidate pair of attention projections the model has (e.g. query/value, or
    q_proj/v_proj in transformers' ViT), else every linear layer; anything else is passed through."""
    if target_modules != "auto":
        return target_modules
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in candidates:
        if set(pair) <= names:
            return list(pair)
    return "all-linear"
