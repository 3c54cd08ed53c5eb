"""Text encoders: a tokenizer and an encoder model, mean or CLS pooling."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loracl.backbones.base import Backbone, check_token_states, mean_pool
from loracl.errors import DataError, LoraclError


class TextBackbone(Backbone):
    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str, name: str, max_length: int = 128) -> None:
        super().__init__(model, model.config.hidden_size, pooling, name)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def collate(self, inputs: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def check_input(self, example: Any, where: str) -> None:
        if not isinstance(example, str):
            raise DataError(f"{where}: the text backbone `{self.name}` needs a string, got {type(example).__name__}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        if self.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, attention_mask)

    def embedding_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings after their norm (BERT-style `embeddings`), mean over real tokens."""
        embeddings = getattr(self.model, "embeddings", None)
        if embeddings is None:
            raise LoraclError(f"backbone `{self.name}` has no `embeddings` module to take embedding-layer features from")
        states = check_token_states(embeddings(input_ids=input_ids), self.hidden_size, self.name)  # [B, L, H]
        return mean_pool(states, attention_mask)

    def pool_tokens(self, states: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the real tokens (padding masked out): [B, L, H] -> [B, H]."""
        return mean_pool(states, inputs["attention_mask"])


def char_tokenizer() -> Any:
    """A character-level tokenizer built in memory (no files, no network), for tiny test models."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    characters = [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
