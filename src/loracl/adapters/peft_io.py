"""PEFT interoperability: write LoRA branches as a PEFT adapter folder, read a PEFT adapter folder back.

The folder is PEFT's own on-disk format (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`), so `peft.PeftModel.from_pretrained(base, folder)`
loads it. Several branches on one module (inc_lora, O-LoRA, ...) are exported exactly as one concatenated pair:
A = [A_1; ...; A_k], B = [s_1 B_1, ..., s_k B_k] with lora_alpha = r so PEFT's scaling is 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loracl.adapters.base import AdapterLayer, MultiBranchLayer
from loracl.adapters.fused import join_fused_projections
from loracl.adapters.inject import inject_adapters
from loracl.adapters.lora import LoraBranch, LoraLayer
from loracl.errors import LoraclError, read_json_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    """One module's LoRA as PEFT stores it: delta = scaling * B A."""

    lora_A: torch.Tensor  # [r, d_in] or [r, c_in, kh, kw]
    lora_B: torch.Tensor  # [d_out, r] or [c_out, r, 1, 1]
    scaling: float


def combine_pairs(pairs: list[LoraPair]) -> LoraPair:
    """Sum of several LoRA deltas as one pair with scaling 1 (exact)."""
    if len(pairs) == 1:
        return pairs[0]
    lora_A = torch.cat([pair.lora_A for pair in pairs], dim=0)
    lora_B = torch.cat([pair.lora_B * pair.scaling for pair in pairs], dim=1)
    return LoraPair(lora_A, lora_B, 1.0)


def write_peft_adapter(
    pairs: dict[str, LoraPair], folder: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write module -> LoraPair as a PEFT LoRA folder; every module must share one rank and scaling."""
    from peft import LoraConfig

    if not pairs:
        raise LoraclError("no LoRA modules to export")
    ranks = {pair.lora_A.shape[0] for pair in pairs.values()}
    scalings = {round(pair.scaling, 12) for pair in pairs.values()}
    if len(ranks) == 1 and len(scalings) == 1:
        rank = ranks.pop()
        alpha = next(iter(pairs.values())).scaling * rank
        rank_pattern, alpha_pattern = {}, {}
    else:  # fold each scaling into B and give every module its own rank with alpha = rank (scaling 1)
        pairs = {name: LoraPair(pair.lora_A, pair.lora_B * pair.scaling, 1.0) for name, pair in pairs.items()}
        rank_pattern = {name: pair.lora_A.shape[0] for name, pair in pairs.items()}
        alpha_pattern = {name: float(rank) for name, rank in rank_pattern.items()}
        rank = max(rank_pattern.values())
        alpha = float(rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(pairs),
        lora_dropout=0.0,
        bias="none",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=base_model_name_or_path,
    )
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
    except OSError as exc:
        raise LoraclError(f"cannot write the adapter to {folder}: {exc.strerror or exc}") from None
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = pair.lora_A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = pair.lora_B.detach().cpu().contiguous()
    temporary = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    temporary.replace(folder / WEIGHTS_FILE)
    return folder


def low_rank_pair(delta: torch.Tensor, relative_tolerance: float = 1e-6) -> LoraPair | None:
    """A weight delta [d_out, d_in] or [c_out, c_in, kh, kw] as an exact LoRA pair (scaling 1) of its numerical
    rank, by SVD in float64; None for a zero delta. Used for adapters that are linear but not (A, B) pairs."""
    flat = delta.detach().double().flatten(1)  # [d_out, d_in * kh * kw]
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return None
    rank = max(1, int((S > S[0] * relative_tolerance).sum()))
    root = S[:rank].sqrt()
    lora_A = (root[:, None] * Vh[:rank]).to(delta.dtype)  # [r, d_in * kh * kw]
    lora_B = (U[:, :rank] * root[None, :]).to(delta.dtype)  # [d_out, r]
    if delta.dim() == 4:  # PEFT's Conv2d LoRA: A a kh x kw conv into r channels, B a 1 x 1 conv
        lora_A = lora_A.reshape(rank, *delta.shape[1:])
        lora_B = lora_B[:, :, None, None]
    return LoraPair(lora_A.contiguous(), lora_B.contiguous(), 1.0)


def served_lora_pair(layer: AdapterLayer) -> LoraPair | None:
    """The delta a layer serves as one PEFT LoRA pair: its (A, B) factors, exactly, where its enabled branches
    are LoRA branches; an SVD of its fixed delta otherwise; None when it adds nothing."""
    if isinstance(layer, MultiBranchLayer):
        names = layer.enabled_branches()
        if not names:
            return None
        if all(isinstance(layer.branches[name], LoraBranch) for name in names):
            with torch.no_grad():
                return combine_pairs([branch_pair(layer, name) for name in names])
    delta = layer.served_delta()
    if delta is None:
        raise LoraclError(f"module `{layer.module_name}`: its delta depends on the input; no fixed LoRA stands for it")
    return low_rank_pair(delta)


def branch_pair(layer: MultiBranchLayer, branch_name: str) -> LoraPair:
    """One LoRA branch with the layer's own factor for it folded into B."""
    branch = layer.branches[branch_name]
    scale = layer.branch_scale(branch_name)
    return LoraPair(branch.lora_A.detach().clone(), (branch.lora_B * scale).detach().clone(), float(branch.scaling))


def lora_layers_to_pairs(layers: dict[str, LoraLayer], branch_names: list[str] | None = None) -> dict[str, LoraPair]:
    """The (summed) LoRA of each wrapper, from the named branches (default: all enabled ones)."""
    pairs = {}
    for name, layer in layers.items():
        names = [n for n in layer.branches if n not in layer.disabled_branches] if branch_names is None else branch_names
        branches = [layer.branches[n] for n in names if n in layer.branches]
        if branches:
            pairs[name] = combine_pairs([LoraPair(b.lora_A.data, b.lora_B.data, b.scaling) for b in branches])
    return pairs


def read_peft_adapter(folder: str | Path) -> tuple[dict, dict[str, LoraPair]]:
    """adapter_config.json as a dict and module -> LoraPair, with clear errors for anything else."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise LoraclError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})")
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise LoraclError(f"{config_path} is not a JSON object of LoRA settings")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraclError(f"{folder}: only LoRA adapters are supported, this one is {config.get('peft_type')}")
    if config.get("use_dora"):
        raise LoraclError(
            f"{folder}: a DoRA adapter (use_dora); its magnitude vector rescales W0 + BA per column, so it is not a sum"
            " of LoRA deltas and is not read"
        )
    if config.get("lora_bias"):
        raise LoraclError(f"{folder}: an adapter with lora_bias; the bias of lora_B is not a low-rank delta and is not read")
    if not weights_path.is_file():
        raise LoraclError(f"{folder}: missing {WEIGHTS_FILE} (pickled .bin adapters are not read: not safe)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise LoraclError(f"{weights_path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    pattern = re.compile(rf"^{re.escape(_PREFIX)}(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = pattern.match(key)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = value
    if not found:
        raise LoraclError(f"{weights_path} holds no lora_A / lora_B weights")
    pairs = {}
    for name, parts in sorted(found.items()):
        if set(parts) != {"A", "B"}:
            raise LoraclError(f"{weights_path}: module `{name}` lacks lora_{'B' if 'A' in parts else 'A'}")
        rank = parts["A"].shape[0]
        short = name.rsplit(".", 1)[-1]
        rank = int(config.get("rank_pattern", {}).get(name, config.get("rank_pattern", {}).get(short, rank)))
        alpha = float(config.get("alpha_pattern", {}).get(name, config.get("alpha_pattern", {}).get(short, config.get("lora_alpha", rank))))
        scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        pairs[name] = LoraPair(parts["A"], parts["B"], scaling)
    return config, pairs


def load_peft_adapter(model: nn.Module, folder: str | Path, branch_name: str = "imported") -> dict[str, LoraLayer]:
    """Inject LoraLayer wrappers into `model` and load a PEFT folder's weights as one branch each (a LoRA on
    a fused projection the model holds split, e.g. `attn.qkv`, joins that projection back into one layer)."""
    _, pairs = read_peft_adapter(folder)
    join_fused_projections(model, list(pairs))
    layers = inject_adapters(model, list(pairs), lambda module, name: LoraLayer(module, name))
    missing = sorted(set(pairs) - set(layers))
    if missing:
        raise LoraclError(f"PEFT adapter {folder} targets modules the model lacks: {missing[:5]}")
    for name, pair in pairs.items():
        layer = layers[name]
        branch = layer.add_branch(branch_name, pair.lora_A.shape[0], alpha=pair.scaling * pair.lora_A.shape[0])
        if branch.lora_A.shape != pair.lora_A.shape or branch.lora_B.shape != pair.lora_B.shape:
            raise LoraclError(f"PEFT adapter {folder}: module `{name}` shapes do not fit the model")
        with torch.no_grad():
            branch.lora_A.copy_(pair.lora_A)
            branch.lora_B.copy_(pair.lora_B)
        branch.scaling = pair.scaling
    return layers
