"""Learnable prompt tokens for a frozen Hugging Face encoder, attached by hooks (the backbone code is untouched).

Two placements (FM-LoRA's meta-prompt, specs/fm-lora.md section 2.5):
    MetaPrompt    shallow: L_p tokens inserted after [CLS] at the embedding output, seen by every block.
    PrefixPrompt  deep: L_p key tokens and L_p value tokens prepended inside the self-attention of the first
                  P blocks (prefix tuning), the sequence itself unchanged.
Both keep their tokens in one parameter `prompts` and switch off with `active = False`, so a method can anchor,
average or bypass them without knowing the placement.
"""

from __future__ import annotations

import copy
import inspect
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracl.errors import LoraclError

PREFIX_ATTENTION = "loracl_prefix"  # the attention implementation name PrefixPrompt registers with transformers


class MetaPrompt(nn.Module):
    """L_p prompt tokens (J components with keys when J > 1) inserted after [CLS] by hooks on a HF encoder.

    Hooks, not a modified backbone: a pre-hook extends the attention mask by L_p ones, a hook on the
    embedding module inserts the tokens, and a hook on the model output removes them again, so pooling
    (CLS or mean) never sees a prompt token.
    """

    def __init__(self, length: int, hidden: int, components: int, temperature: float, init_std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.length = length
        self.temperature = temperature
        self.prompts = nn.Parameter(torch.randn(components, length, hidden, generator=generator) * init_std)  # [J, L_p, d]
        if components > 1:
            self.keys = nn.Parameter(torch.randn(components, hidden, generator=generator) * init_std)  # [J, d]
        else:
            self.register_parameter("keys", None)
        self.active = True
        self._token_mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._extend_positions = False

    def install(self, encoder: nn.Module) -> None:
        """Hook into a HF encoder that has an `embeddings` module (BERT, ViT and their relatives)."""
        embeddings = getattr(encoder, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            raise LoraclError(
                f"fm_lora's meta-prompt needs a backbone with an `embeddings` module (BERT/ViT-style); "
                f"{type(encoder).__name__} has none: set prompt_len: 0"
            )
        # Rotary encoders (ModernBERT) take position ids after the embedding layer, from the input length: give
        # them ids for the longer prompted sequence. BERT-style embeddings add positions before the prompt exists.
        self._extend_positions = "position_ids" in inspect.signature(encoder.forward).parameters and (
            "position_ids" not in inspect.signature(embeddings.forward).parameters
        )
        self._handles = [
            encoder.register_forward_pre_hook(self._extend_attention_mask, with_kwargs=True),
            embeddings.register_forward_hook(self._insert),
            encoder.register_forward_hook(self._strip),
        ]

    def current(self, embedded: torch.Tensor) -> torch.Tensor:
        """The prompt for each example [B, L_p, d]: the static prompt, or a key-weighted mixture (J > 1)."""
        batch = embedded.shape[0]
        if self.keys is None:
            return self.prompts[0].unsqueeze(0).expand(batch, -1, -1)
        mask = self._token_mask
        if mask is None or mask.shape[:2] != embedded.shape[:2]:
            mask = torch.ones(embedded.shape[:2], device=embedded.device)
        mask = mask.unsqueeze(-1).to(embedded.dtype)
        query = (embedded * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, d] mean of the embedded input
        weights = torch.softmax(self.temperature * F.cosine_similarity(query[:, None], self.keys[None], dim=-1), dim=-1)
        return torch.einsum("bj,jld->bld", weights, self.prompts.to(embedded.dtype))

    def _extend_attention_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._token_mask = kwargs.get("attention_mask")
        if not self.active:
            return None
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:  # [B, L] -> [B, 1 + L_p + L - 1]
            ones = torch.ones(mask.shape[0], self.length, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self._extend_positions and kwargs.get("position_ids") is None and isinstance(input_ids, torch.Tensor):
            # rotary attention is relative: shifting the text tokens by L_p leaves their mutual scores unchanged
            kwargs["position_ids"] = torch.arange(input_ids.shape[1] + self.length, device=input_ids.device).unsqueeze(0)
        return args, kwargs

    def _insert(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return output
        prompt = self.current(output).to(output.dtype)  # [B, L_p, d]
        return torch.cat([output[:, :1], prompt, output[:, 1:]], dim=1)

    def _strip(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.active:
            return output
        hidden = output.last_hidden_state  # [B, 1 + L_p + L', d] -> [B, 1 + L', d]
        output.last_hidden_state = torch.cat([hidden[:, :1], hidden[:, 1 + self.length :]], dim=1)
        return output


# The key projection of a HF self-attention module, by model family: BERT/ViT `key`, Llama-style `k_proj`,
# fused ModernBERT `Wqkv`, Phi-3 `qkv_proj`.
_KEY_PROJECTIONS = ("key", "k_proj", "Wqkv", "qkv_proj")


def attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a HF encoder in block order: those holding a key projection and the
    config through which they pick their attention function."""
    return [
        module
        for module in encoder.modules()
        if hasattr(module, "config") and any(isinstance(getattr(module, name, None), nn.Module) for name in _KEY_PROJECTIONS)
    ]


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention with the module's prefix keys and values in front (query [B, H, L, h])."""
    if kwargs.get("is_causal") or getattr(module, "is_causal", False):  # CLIP's text encoder says so per call
        raise LoraclError(f"the deep prompt is for bidirectional encoders; {type(module).__name__} attends causally: use prompt_depth: shallow")
    prefix = module.loracl_prefix()  # None while the prompt is bypassed, else ([L_p, H h], [L_p, H h])
    if prefix is not None:
        batch, heads, _, head_dim = key.shape
        if prefix[0].shape[-1] != heads * head_dim:
            raise LoraclError(
                f"deep prompt width {prefix[0].shape[-1]} != attention width {heads * head_dim} "
                f"({type(module).__name__}): use prompt_depth: shallow for this backbone"
            )

        def split_heads(tokens: torch.Tensor) -> torch.Tensor:  # [L_p, H h] -> [B, H, L_p, h]
            return tokens.to(key.dtype).view(1, -1, heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)

        key = torch.cat([split_heads(prefix[0]), key], dim=2)
        value = torch.cat([split_heads(prefix[1]), value], dim=2)
        if attention_mask is not None:  # HF masks: bool (True = attend) or additive float (0 = attend)
            visible = True if attention_mask.dtype == torch.bool else 0.0
            pad = torch.full((*attention_mask.shape[:-1], prefix[0].shape[0]), visible, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return output.transpose(1, 2).contiguous(), None  # [B, L, H, h]; no attention weights (output_attentions gives None)


class PrefixPrompt(nn.Module):
    """Deep meta-prompt: L_p learnable key and value tokens prefixed in the first `layers` attention blocks.

    HF attention modules view the key projection with the query's length, so a prefix cannot be added around
    the projections; instead the chosen blocks get a copy of the model config that names our attention
    function, registered through transformers' own extension point (AttentionInterface). The function is
    stateless: it reads the prefix through a plain callable on the module, so no state_dict key changes.
    """

    def __init__(self, length: int, hidden: int, layers: int, init_std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.length = length
        self.layers = layers
        self.prompts = nn.Parameter(torch.randn(layers, 2, length, hidden, generator=generator) * init_std)  # [P, key/value, L_p, d]
        self.active = True

    def install(self, encoder: nn.Module) -> None:
        """Route the first `layers` self-attention blocks through `prefix_attention`."""
        from transformers.modeling_utils import AttentionInterface

        blocks = attention_blocks(encoder)
        if not blocks:
            raise LoraclError(f"no self-attention blocks found in {type(encoder).__name__} for the deep prompt: use prompt_depth: shallow")
        if len(blocks) < self.layers:
            raise LoraclError(
                f"prompt_layers {self.layers} exceeds the {len(blocks)} self-attention blocks found in "
                f"{type(encoder).__name__}: set prompt_layers <= {len(blocks)} or prompt_depth: shallow"
            )
        causal = [type(block).__name__ for block in blocks[: self.layers] if getattr(block, "is_causal", False)]
        if causal:  # prefix_attention attends both ways; a causal mask would be lost on SDPA's mask-free path
            raise LoraclError(f"the deep prompt is for bidirectional encoders; {causal[0]} is causal: use prompt_depth: shallow")
        AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)  # idempotent: same name, same function
        for index, block in enumerate(blocks[: self.layers]):
            block.config = copy.copy(block.config)
            block.config._attn_implementation = PREFIX_ATTENTION
            block.loracl_prefix = partial(self.prefix_for, index)  # a plain attribute, not a submodule

    def prefix_for(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Block `index`'s prefix (keys [L_p, d], values [L_p, d]), or None while bypassed."""
        if not self.active:
            return None
        return self.prompts[index, 0], self.prompts[index, 1]
