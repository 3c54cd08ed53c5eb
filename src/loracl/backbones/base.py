"""The Backbone interface: inputs in, pooled features [batch, hidden] out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from loracl.errors import LoraclError


class Backbone(nn.Module):
    """A Hugging Face model (`self.model`, where adapters are injected) with preprocessing and pooling."""

    modality: str = ""

    def __init__(self, model: nn.Module, hidden_size: int, pooling: str, name: str) -> None:
        super().__init__()
        self.model = model
        self.hidden_size = hidden_size
        self.pooling = pooling
        self.name = name
        self.name_or_path = name  # what from_pretrained needs to load the same base model again

    def collate(self, inputs: list[Any]) -> dict[str, torch.Tensor]:
        """Turn raw inputs (strings or arrays) into the model's keyword tensors."""
        raise NotImplementedError

    def check_input(self, example: Any, where: str) -> None:
        """Raise DataError naming `where` if one raw input cannot be fed to this backbone."""

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features [batch, hidden]."""
        raise NotImplementedError

    def embedding_features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Mean-pooled output of the embedding layer alone [batch, hidden]: a cheap input descriptor (no block runs)."""
        raise NotImplementedError(f"{type(self).__name__} has no embedding-layer features")

    def pool_tokens(self, states: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of token states [B, tokens, hidden] over the real tokens -> [B, hidden]."""
        return states.mean(1)

    def blocks(self) -> nn.ModuleList:
        """The model's stack of transformer blocks (BERT-like encoders: `encoder.layer`; ViT: `layers` or
        `encoder.layer`, by transformers version)."""
        for path in _BLOCK_STACK_PATHS:
            blocks: Any = self.model
            for attribute in path.split("."):
                blocks = getattr(blocks, attribute, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return blocks
        raise LoraclError(
            f"backbone `{self.name}` has no transformer block stack ({', '.join(_BLOCK_STACK_PATHS)})"
        )

    def block_indices(self, module_names: list[str]) -> dict[str, int | None]:
        """For each module name (in self.model): the index of the block that holds it, None if outside the stack."""
        index_of_block = {id(block): index for index, block in enumerate(self.blocks())}
        block_names = {name: index_of_block[id(module)] for name, module in self.model.named_modules() if id(module) in index_of_block}
        found: dict[str, int | None] = {}
        for module_name in module_names:
            holders = [index for name, index in block_names.items() if module_name == name or module_name.startswith(name + ".")]
            found[module_name] = holders[0] if holders else None
        return found

    @contextmanager
    def capture_block_output(self, depth: int) -> Iterator[list[Any]]:
        """Record the raw output of block `depth` (1-based: after `depth` blocks) during the passes run inside."""
        captured: list[Any] = []
        handle = self.blocks()[depth - 1].register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            yield captured
        finally:
            handle.remove()

    @contextmanager
    def skip_blocks(self, depth: int, output: Any) -> Iterator[None]:
        """Passes run inside start after block `depth`: the first `depth` blocks are replaced by one that returns
        `output` (a block output recorded by capture_block_output for the same inputs). Exact when those blocks
        hold no adapter: the embeddings and masks are still computed, the skipped blocks are not."""
        blocks = self.blocks()
        originals = [blocks[index] for index in range(depth)]
        replay = _ReplayBlock(output)
        for index in range(depth):
            blocks[index] = replay
        try:
            yield
        finally:
            for index, block in enumerate(originals):
                blocks[index] = block

    def block_features(self, depth: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Mean-pooled token states after the first `depth` blocks [batch, hidden]; the later blocks never run."""
        blocks = self.blocks()
        if not 1 <= depth <= len(blocks):
            raise LoraclError(f"backbone `{self.name}` has {len(blocks)} blocks; cannot read features after block {depth}")
        captured: list[Any] = []

        def stop_after(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        # A hook that raises leaves the Hugging Face forward right after the block we read: any model with a
        # block stack works without re-implementing its forward (masks, position ids) here.
        handle = blocks[depth - 1].register_forward_hook(stop_after)
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise LoraclError(f"backbone `{self.name}`: block {depth} did not run in the forward pass")
        states = check_token_states(captured[0], self.hidden_size, self.name, f"its block {depth}")
        return self.pool_tokens(states, inputs)

    def freeze(self) -> None:
        """Freeze every backbone weight (adapters add their own trainable parameters later)."""
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "hidden_size": self.hidden_size, "pooling": self.pooling}


_BLOCK_STACK_PATHS = ("encoder.layer", "encoder.layers", "layers")


class _StopForward(Exception):
    """Raised by a forward hook to leave the model once the block being read has run."""


class _ReplayBlock(nn.Module):
    """Stands in for skipped blocks: ignores its inputs and returns a recorded block output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def select_block_output(output: Any, rows: torch.Tensor) -> Any:
    """The rows of a recorded block output (a tensor [B, ...] or a tuple holding such tensors)."""
    if isinstance(output, torch.Tensor):
        return output[rows]
    if isinstance(output, tuple):
        return tuple(select_block_output(item, rows) for item in output)
    return output


def check_token_states(states: Any, hidden_size: int, backbone_name: str, source: str = "its embedding layer") -> torch.Tensor:
    """Features read inside the model (`source`) must be token states [B, tokens, hidden]; anything else is refused
    clearly."""
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[-1] != hidden_size:
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise LoraclError(
            f"backbone `{backbone_name}`: {source} gives {shape}, not token states [batch, tokens, "
            f"{hidden_size}]; token features (metalora extractors `embed` and `blocks`) need BERT- or ViT-style models"
        )
    return states


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of token states where mask is 1: [B, L, H], [B, L] -> [B, H]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
