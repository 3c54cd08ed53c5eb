"""Fused projections (timm's `attn.qkv`, ModernBERT's `Wqkv`, Phi-3's `qkv_proj`) split into named parts.

Many specs adapt slices of a fused linear layer as independent targets (FM-LoRA: the q and v slices of timm's
`qkv`; InfLoRA: k and v; LoRAC-IPC: q, k and v as three slots). Rather than teaching every adapter type to act
on a row range, the fused nn.Linear is replaced by a `FusedProjection` whose children `q`, `k`, `v` are plain
nn.Linear layers holding the row blocks of the fused weight; its output is their concatenation, so the model
computes the same function and every adapter and method targets the parts by name (`q`, `v`, ...).

On disk (PEFT folders) module names stay the original model's: the LoRAs of a projection's parts are folded
into one exact block LoRA on the fused layer (`fold_part_pairs`), which PEFT loads on the unsplit model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from loracl.adapters.base import names_module, swap_module
from loracl.errors import LoraclError

# `split_fused: auto`: fused attention projections known to hold [q; k; v] in three equal contiguous row blocks,
# by layer name and the class of the attention module holding it (timm ViT, ModernBERT, MPT, Phi-3 without
# grouped KV heads). Others are left whole: GPT-NeoX / Bloom `query_key_value` and MiniMax interleave q, k, v
# per head, CodeGen's `qkv_proj` over shards, so contiguous thirds would carry the wrong names; such layouts
# can still be split under names of the user's choosing with an explicit rule.
AUTO_FUSED = {"qkv": ("Attention",), "Wqkv": ("ModernBertAttention", "MptAttention"), "qkv_proj": ("Phi3Attention",)}
AUTO_PARTS = ("q", "k", "v")

SplitRule = Mapping[str, Sequence[str] | Mapping[str, int]]


class FusedProjection(nn.Module):
    """A fused nn.Linear as named row blocks: y = cat([part(x) for part in parts], -1)."""

    def __init__(self, linear: nn.Linear, parts: Sequence[tuple[str, int]]) -> None:
        super().__init__()
        self.part_sizes = [(name, size) for name, size in parts]
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        start = 0
        for name, size in self.part_sizes:
            part = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(linear.weight[start : start + size])
                if linear.bias is not None:
                    part.bias.copy_(linear.bias[start : start + size])
            part.weight.requires_grad_(linear.weight.requires_grad)
            if linear.bias is not None:
                part.bias.requires_grad_(linear.bias.requires_grad)
            self.add_module(name, part)
            start += size

    def parts(self) -> list[tuple[str, nn.Module]]:
        """The part modules in row order (adapter wrappers once injected)."""
        return [(name, getattr(self, name)) for name, _ in self.part_sizes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for _, part in self.parts()], dim=-1)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The fused nn.Linear again, from the parts' weights."""
        bases = [part for _, part in self.parts()]
        weight = torch.cat([base.weight for base in bases], dim=0)  # [out, in]
        linear = nn.Linear(self.in_features, self.out_features, bias=bases[0].bias is not None, device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(torch.cat([base.bias for base in bases]))
        linear.requires_grad_(bases[0].weight.requires_grad)
        return linear


def _part_layout(name: str, linear: nn.Module, parts: Sequence[str] | Mapping[str, int]) -> list[tuple[str, int]]:
    """[(part name, rows)] for one fused layer, checked against its output size."""
    if not isinstance(linear, nn.Linear):
        raise LoraclError(f"split_fused: `{name}` is a {type(linear).__name__}; only nn.Linear layers can be split")
    if isinstance(parts, Mapping):
        layout = [(str(part), int(size)) for part, size in parts.items()]
    else:
        if not parts or linear.out_features % len(parts):
            raise LoraclError(
                f"split_fused: `{name}` has {linear.out_features} output rows, not divisible into {len(parts)} equal parts "
                f"{list(parts)}; give sizes instead, e.g. {{q: ..., k: ..., v: ...}}"
            )
        layout = [(str(part), linear.out_features // len(parts)) for part in parts]
    names = [part for part, _ in layout]
    if len(set(names)) != len(names) or len(names) < 2:
        raise LoraclError(f"split_fused: `{name}` needs at least two distinct part names, got {names}")
    bad = [part for part in names if not part.isidentifier()]
    if bad:
        raise LoraclError(f"split_fused: part name {bad[0]!r} of `{name}` is not a valid module name")
    if any(size < 1 for _, size in layout):
        raise LoraclError(f"split_fused: every part of `{name}` needs at least one row, got sizes {dict(layout)}")
    if sum(size for _, size in layout) != linear.out_features:
        raise LoraclError(
            f"split_fused: parts of `{name}` have sizes {[size for _, size in layout]} summing to "
            f"{sum(size for _, size in layout)}; the layer has {linear.out_features} output rows"
        )
    return layout


def split_fused_projections(model: nn.Module, rule: str | SplitRule) -> dict[str, list[tuple[str, int]]]:
    """Replace fused linear layers by FusedProjection in place; returns {module name: [(part, rows)]}.

    `rule`: "off"; "auto" (qkv / Wqkv / qkv_proj of the attention classes in AUTO_FUSED with out = 3 x in,
    split into q, k, v); or
    {module name or dotted suffix: [part names] (equal blocks) or {part name: rows}}; a key matching nothing
    is an error."""
    if rule == "off":
        return {}
    layouts: dict[str, list[tuple[str, int]]] = {}
    if rule == "auto":
        for name, module in list(model.named_modules()):
            parent_name, _, short = name.rpartition(".")
            holder = type(model.get_submodule(parent_name) if parent_name else model).__name__
            if (
                holder in AUTO_FUSED.get(short, ())
                and isinstance(module, nn.Linear)
                and module.out_features == 3 * module.in_features
            ):
                layouts[name] = _part_layout(name, module, AUTO_PARTS)
    elif isinstance(rule, Mapping):
        for key, parts in rule.items():
            matched = [
                (name, module)
                for name, module in model.named_modules()
                if name and names_module(name, key) and not isinstance(module, FusedProjection)
            ]
            if not matched:
                raise LoraclError(f"split_fused: no module named `{key}` in the model")
            for name, module in matched:
                layouts[name] = _part_layout(name, module, parts)
    else:
        raise LoraclError(f"split_fused must be 'auto', 'off' or a mapping of module -> parts, got {rule!r}")
    for name, layout in layouts.items():
        swap_module(model, name, FusedProjection(model.get_submodule(name), layout))
    return layouts


def fused_layouts(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """{fused module name: [(part, rows)]} of the FusedProjections in a model."""
    return {name: list(module.part_sizes) for name, module in model.named_modules() if isinstance(module, FusedProjection)}


def join_fused_projections(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Put the named (default: all) FusedProjections back as plain nn.Linear; refused over adapted parts."""
    joined = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, FusedProjection) or (names is not None and name not in names):
            continue
        adapted = [part for part, layer in module.parts() if not isinstance(layer, nn.Linear)]
        if adapted:
            raise LoraclError(f"`{name}.{adapted[0]}` carries an adapter: cannot join `{name}` back into one layer")
        swap_module(model, name, module.to_linear())
        joined.append(name)
    return joined


def fold_part_pairs(pairs: Mapping, layouts: Mapping[str, Sequence[Sequence]]) -> dict:
    """LoRA pairs on parts (`<fused>.<part>`) -> one exact LoRA on each fused layer; other pairs pass through.

    The parts' deltas stack into the fused delta's rows, so with A = [A_1; ...; A_m] and B block-diagonal
    (part i's rows of B hold s_i B_i in columns of A_i, zeros elsewhere), B A equals that delta, scaling 1."""
    from loracl.adapters.peft_io import LoraPair

    folded: dict = {}
    by_fused: dict[str, dict[str, LoraPair]] = {}
    part_owner = {f"{fused}.{part}": (fused, part) for fused, layout in layouts.items() for part, _ in layout}
    for name, pair in pairs.items():
        if name in part_owner:
            fused, part = part_owner[name]
            by_fused.setdefault(fused, {})[part] = pair
        else:
            folded[name] = pair
    for fused, part_pairs in by_fused.items():
        layout = [(part, int(size)) for part, size in layouts[fused]]
        present = [(part, size) for part, size in layout if part in part_pairs]
        if any(part_pairs[part].lora_A.dim() != 2 for part, _ in present):
            raise LoraclError(f"`{fused}`: only linear LoRA pairs can be folded")
        lora_A = torch.cat([part_pairs[part].lora_A for part, _ in present], dim=0)  # [sum r_i, in]
        first = part_pairs[present[0][0]].lora_B
        lora_B = first.new_zeros(sum(size for _, size in layout), lora_A.shape[0])  # [out, sum r_i]
        row, column = 0, 0
        for part, size in layout:
            if part in part_pairs:
                pair = part_pairs[part]
                rank = pair.lora_A.shape[0]
                lora_B[row : row + size, column : column + rank] = pair.lora_B * pair.scaling
                column += rank
            row += size
        folded[fused] = LoraPair(lora_A, lora_B, 1.0)
    return folded


def join_part_states(state: Mapping[str, torch.Tensor], layouts: Mapping[str, Sequence[Sequence]], prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict of a split model -> the unsplit model's keys (`<fused>.<part>.weight` rows stacked into
    `<fused>.weight`, biases alike), so a saved backbone loads into the original model."""
    joined = dict(state)
    for fused, layout in layouts.items():
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{fused}.{part}.{kind}" for part, _ in layout]
            if all(key in joined for key in keys):
                joined[f"{prefix}{fused}.{kind}"] = torch.cat([joined.pop(key) for key in keys], dim=0)
    return joined


def split_part_states(state: Mapping[str, torch.Tensor], layouts: Mapping[str, Sequence[Sequence]], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of join_part_states: `<fused>.weight` rows cut into `<fused>.<part>.weight` per layout."""
    split = dict(state)
    for fused, layout in layouts.items():
        for kind in ("weight", "bias"):
            key = f"{prefix}{fused}.{kind}"
            if key in split:
                rows = split.pop(key)
                start = 0
                for part, size in layout:
                    split[f"{prefix}{fused}.{part}.{kind}"] = rows[start : start + int(size)].clone()
                    start += int(size)
    return split
