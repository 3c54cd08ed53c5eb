"""Image encoders (ViT, ResNet, any AutoModel for images): arrays [C, H, W] in [0, 1] in, pooled features out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from loracl.backbones.base import Backbone, check_token_states
from loracl.errors import DataError, LoraclError


class VisionBackbone(Backbone):
    modality = "image"

    def __init__(
        self,
        model: nn.Module,
        hidden_size: int,
        pooling: str,
        name: str,
        image_size: int,
        num_channels: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__(model, hidden_size, pooling, name)
        self.image_size = image_size
        self.num_channels = num_channels
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def check_input(self, example: Any, where: str) -> None:
        expected = (self.num_channels, self.image_size, self.image_size)
        shape = tuple(np.shape(example))
        if shape != expected:
            raise DataError(f"{where}: image of shape {shape}, the backbone `{self.name}` expects {expected} (C, H, W)")

    def collate(self, inputs: list[np.ndarray]) -> dict[str, torch.Tensor]:
        pixels = torch.as_tensor(np.stack(inputs), dtype=torch.float32)  # [B, C, H, W]
        return {"pixel_values": (pixels - self.pixel_mean.cpu()) / self.pixel_std.cpu()}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values)
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # convolutional: [B, C, H, W] -> global average pool
            return hidden.mean(dim=(2, 3))
        if self.pooling == "mean":
            return hidden[:, 1:].mean(1)
        return hidden[:, 0]  # [B, tokens, H] -> CLS token

    def embedding_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT-style `embeddings` (patches + CLS + positions), mean over tokens; other embedding outputs (a
        convolutional stem's feature map, a tuple) are refused with one clear error."""
        embeddings = getattr(self.model, "embeddings", None)
        if embeddings is None:
            raise LoraclError(f"backbone `{self.name}` has no ViT-style `embeddings` module to take embedding-layer features from")
        return check_token_states(embeddings(pixel_values), self.hidden_size, self.name).mean(1)  # [B, tokens, H] -> [B, H]
