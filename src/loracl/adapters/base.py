"""The common shape of an adapter wrapper: a frozen base layer plus a delta that can be merged into it."""

from __future__ import annotations

import torch
from torch import nn

from loracl.errors import LoraclError

SUPPORTED_BASE_TYPES = (nn.Linear, nn.Conv2d)


def check_base_layer(base_layer: nn.Module, name: str = "") -> None:
    """Refuse layer types an adapter cannot wrap, naming the module."""
    label = f"module `{name}`" if name else "module"
    if not isinstance(base_layer, SUPPORTED_BASE_TYPES):
        raise LoraclError(f"{label} is a {type(base_layer).__name__}; adapters wrap nn.Linear and nn.Conv2d only")
    if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
        raise LoraclError(f"{label}: grouped convolutions (groups={base_layer.groups}) are not supported")


class AdapterLayer(nn.Module):
    """A frozen nn.Linear/nn.Conv2d with a trainable delta; subclasses define the delta."""

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        check_base_layer(base_layer, name)
        self.base_layer = base_layer
        self.module_name = name
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels if self.is_conv else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels if self.is_conv else self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `layer.weight` keeps working after injection."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def merge(self) -> None:
        """Add the mergeable delta into the base weight (outputs unchanged up to rounding)."""
        raise NotImplementedError

    def unmerge(self) -> None:
        """Subtract a previously merged delta from the base weight."""
        raise NotImplementedError

    @property
    def merged(self) -> bool:
        raise NotImplementedError
