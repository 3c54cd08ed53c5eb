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

from loracl.adapters.fused import fold_part_pairs, join_fused_projections
from loracl.adapters.inject import inject_adapters
from loracl.adapters.lora import LoraLayer
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
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = pair.lora_A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = pair.lora_B.detach().cpu().contiguous()
    temporary = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    temporary.replace(folder / WEIGHTS_FILE)
    return folder


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
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraclError(f"{folder}: only LoRA adapters are supported, this one is {config.get('peft_type')}")
    if not weights_path.is_file():
        raise LoraclError(f"{folder}: missing {WEIGHTS_FILE} (pickled .bin adapters are not read: not safe)")
    tensors = load_file(str(weights_path))
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


_BRANCH_KEY = re.compile(r"^backbone\.model\.(.+)\.branches\.([^.]+)\.lora_(A|B)$")


def export_run_task(run_dir: Path, task: int, out: Path) -> Path:
    """Write the LoRA a run had after task `task` (-1: the last finished) as a PEFT adapter folder."""
    from loracl.engine.checkpoint import RECORD_FILE, STATE_FILE, latest_checkpoint

    run_dir = Path(run_dir)
    folder = latest_checkpoint(run_dir) if task < 0 else run_dir / "checkpoints" / f"task_{task}"
    if folder is None or not (folder / RECORD_FILE).is_file():
        raise LoraclError(f"no finished checkpoint {'' if task < 0 else f'for task {task} '}in {run_dir}/checkpoints")
    record = read_json_file(folder / RECORD_FILE)
    entry = record.get("method_entry", {})
    state = load_file(str(folder / STATE_FILE))
    branches: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = _BRANCH_KEY.match(key)
        if match:
            module, branch, part = match.groups()
            branches.setdefault(module, {}).setdefault(branch, {})[part] = value
    if not branches:
        raise LoraclError(
            f"method `{entry.get('name', '?')}` in {run_dir} stores no plain LoRA branches; "
            "export supports the LoRA-branch methods (seq_lora, inc_lora, joint, o_lora, inflora)"
        )
    alpha = float(entry.get("alpha", 16.0))
    use_rslora = bool(entry.get("use_rslora", False))
    pairs = {}
    for module, by_branch in branches.items():
        module_pairs = []
        for parts in by_branch.values():
            rank = parts["A"].shape[0]
            scaling = alpha / rank**0.5 if use_rslora else alpha / rank
            module_pairs.append(LoraPair(parts["A"], parts["B"], scaling))
        pairs[module] = combine_pairs(module_pairs)
    pairs = fold_part_pairs(pairs, record.get("fused_layouts", {}))
    return write_peft_adapter(pairs, out, record.get("backbone_path"))
