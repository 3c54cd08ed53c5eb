"""The language task model: instruction prompts in, answer text out (continual instruction tuning).

Training: the loss is cross-entropy on the answer tokens only, with vocabulary logits computed only where the loss
needs them; the input is truncated to fit `train.max_length`, never the instruction or the answer. Evaluation:
batched greedy decoding (left padding, KV cache, stop at end of sequence) scored by exact match after normalising
case and whitespace, plus ROUGE-L; or, for label tasks, `rank` scoring (the option with the highest
log-likelihood). The vocabulary head is the model's own and stays frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from loracl.backbones.language import LanguageBackbone
from loracl.config import TaskModelConfig
from loracl.data.stream import Split, Task
from loracl.errors import ConfigError, DataError
from loracl.task_models.base import TaskModel

if TYPE_CHECKING:
    from loracl.methods.base import MethodContext

IGNORE = -100  # label value cross-entropy skips (the Hugging Face convention)


def normalise_answer(text: str) -> str:
    """Exact-match normal form: lower case, runs of whitespace as one space, no outer whitespace."""
    return " ".join(text.lower().split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence); written here because the
    `rouge_score` package pulls nltk and absl for these fifteen lines."""
    predicted, wanted = prediction.lower().split(), reference.lower().split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    previous = [0] * (len(wanted) + 1)
    for token in predicted:
        current = [0]
        for position, other in enumerate(wanted):
            current.append(previous[position] + 1 if token == other else max(previous[position + 1], current[-1]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


class LanguageTaskModel(TaskModel):
    """A causal or encoder-decoder language model used as it is: prompt = instruction + options + input (through
    the chat template where there is one), target = the answer text and the end-of-sequence token."""

    kind: ClassVar[str] = "language"
    backbone: LanguageBackbone

    def __init__(self, backbone: LanguageBackbone, options: TaskModelConfig | None = None) -> None:
        super().__init__(backbone)
        self.options = options or TaskModelConfig(kind="language")
        tokenizer = backbone.tokenizer
        self.prediction_fill = float(tokenizer.pad_token_id)  # type: ignore[misc]  # generated rows pad with <pad>
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.options.chat_template == "on" and not has_template:
            raise ConfigError(
                f"task_model.chat_template: on, but the tokenizer of `{backbone.name}` has no chat template"
                " (use auto or off)"
            )
        self.use_chat_template = has_template and self.options.chat_template != "off"

    # ----- prompts ---------------------------------------------------------------------------------------
    def _prompt_ids(self, header: str, text: str) -> list[int]:
        tokenizer = self.backbone.tokenizer
        user = f"{header}\nInput: {text}"
        if self.use_chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return tokenizer(f"{user}\nAnswer:")["input_ids"]

    def prompt_ids(self, header: str, text: str, where: str) -> list[int]:
        """The prompt's token ids, the input text shortened (from its end) until the prompt fits max_length."""
        limit = self.backbone.max_length
        ids = self._prompt_ids(header, text)
        if len(ids) <= limit:
            return ids
        tokenizer = self.backbone.tokenizer
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = max(len(input_ids) - (len(ids) - limit), 0)
        for _ in range(4):  # re-tokenising a cut text can differ by a token or two: shorten until it fits
            ids = self._prompt_ids(header, tokenizer.decode(input_ids[:keep]))
            if len(ids) <= limit or keep == 0:
                break
            keep = max(keep - (len(ids) - limit), 0)
        if len(ids) > limit:
            raise DataError(
                f"{where}: the instruction and template alone take {len(ids)} tokens, more than train.max_length"
                f" {limit}; raise train.max_length or shorten the instruction"
            )
        return ids

    def answer_ids(self, answer: str, where: str) -> list[int]:
        """The answer's token ids and the end-of-sequence token; an answer longer than max_answer_tokens is an error."""
        tokenizer = self.backbone.tokenizer
        text = answer if (self.use_chat_template or self.backbone.is_encoder_decoder) else " " + answer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > self.options.max_answer_tokens:
            raise DataError(
                f"{where}: the answer takes {len(ids)} tokens, more than task_model.max_answer_tokens"
                f" {self.options.max_answer_tokens} (the answer is never truncated)"
            )
        return ids

    def check_stream(self, stream: Any) -> None:
        """Every answer fits max_answer_tokens and every prompt's instruction fits max_length, checked up front."""
        for task in stream.tasks:
            for split_name, split in (("train", task.train), ("test", task.test)):
                if not split.targets:
                    raise DataError(f"task `{task.name}`: its examples have no answer texts for a language model")
                for index, answer in enumerate(split.targets):
                    self.answer_ids(answer, f"task `{task.name}` {split_name} example {index}")
                for header in sorted(set(split.headers)):
                    self.prompt_ids(header, "", f"task `{task.name}` instruction")

    def collate(self, split: Split, indices: list[int], task: Task, train: bool) -> dict[str, torch.Tensor]:
        """Training: prompt + answer, right-padded, `target_ids` = answer tokens else -100; evaluation: prompts
        left-padded for generation, `option_ids` [B, K, T] of the task's options for rank scoring."""
        if not split.targets:
            raise DataError(f"task `{task.name}`: its examples have no answer texts for a language model")
        pad = self.backbone.tokenizer.pad_token_id
        prompts, answers = [], []
        for index in indices:
            where = f"task `{task.name}` example {index}"
            header = split.headers[index] if split.headers else "Answer the input."
            prompts.append(self.prompt_ids(header, split.inputs[index], where))
            answers.append(self.answer_ids(split.targets[index], where))
        if train or split is task.train:  # training data with its answers, also for statistics passes over it
            return self._training_batch(prompts, answers, pad)
        batch = self._prompt_batch(prompts, pad)
        if self.options.scoring == "rank":
            if task.free_form:
                raise ConfigError(f"task_model.scoring: rank needs label options; task `{task.name}` is free-form")
            options = [self.answer_ids(answer, f"task `{task.name}` option") for answer in task_options(split, task)]
            width = max(len(ids) for ids in options)
            grid = torch.full((len(options), width), IGNORE, dtype=torch.long)
            for row, ids in enumerate(options):
                grid[row, : len(ids)] = torch.tensor(ids)
            batch["option_ids"] = grid.unsqueeze(0).expand(len(indices), -1, -1).contiguous()  # [B, K, T]
        return batch

    def _training_batch(self, prompts: list[list[int]], answers: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
        if self.backbone.is_encoder_decoder:
            batch = self._prompt_batch(prompts, pad, left=False)
            width = max(len(ids) for ids in answers)
            targets = torch.full((len(answers), width), IGNORE, dtype=torch.long)
            for row, ids in enumerate(answers):
                targets[row, : len(ids)] = torch.tensor(ids)
            batch["target_ids"] = targets
            return batch
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        prompt_mask = torch.zeros_like(input_ids)
        targets = torch.full_like(input_ids, IGNORE)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            sequence = prompt + answer
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
            prompt_mask[row, : len(prompt)] = 1
            targets[row, len(prompt) : len(sequence)] = torch.tensor(answer)
        return {"input_ids": input_ids, "attention_mask": attention, "prompt_mask": prompt_mask, "target_ids": targets}

    @staticmethod
    def _prompt_batch(prompts: list[list[int]], pad: int, left: bool = True) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            attention[row, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "prompt_mask": attention.clone()}
        if left:  # positions count real tokens only, as generate() does for left-padded prompts
            batch["position_ids"] = (attention.cumsum(1) - 1).clamp(min=0)
        return batch

    # ----- training ---------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:  # type: ignore[override]
        """Vocabulary logits at the answer positions only [N answer tokens, V]."""
        inputs = batch["inputs"]
        model = self.backbone.model
        if self.backbone.is_encoder_decoder:
            targets = inputs["target_ids"]
            decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=targets.clamp(min=0))
            decoder_inputs = decoder_inputs.masked_fill(decoder_inputs == IGNORE, self.backbone.tokenizer.pad_token_id)
            out = model(**self.backbone.prompted(inputs), decoder_input_ids=decoder_inputs, use_cache=False)
            return out.logits[targets != IGNORE]
        states = self.backbone.hidden_states({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
        picked = inputs["target_ids"][:, 1:] != IGNORE  # the state at t predicts token t + 1
        return model.get_output_embeddings()(states[:, :-1][picked])

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], task: Task | None, context: MethodContext) -> torch.Tensor:
        """Mean cross-entropy over the batch's answer tokens (what `labels=` gives in Hugging Face models)."""
        targets = batch["inputs"]["target_ids"]
        wanted = targets[targets != IGNORE] if self.backbone.is_encoder_decoder else targets[:, 1:][targets[:, 1:] != IGNORE]
        return F.cross_entropy(outputs.float(), wanted)

    def input_pass(self, batch: dict[str, Any]) -> torch.Tensor:
        """A training batch's full forward (an encoder-decoder's decoder layers need the answers); prompts
        alone run the prompt's features."""
        return self(batch) if "target_ids" in batch["inputs"] else self.features(batch["inputs"])

    # ----- inference --------------------------------------------------------------------------------------
    def predict(self, batch: dict[str, Any], features: torch.Tensor | None = None) -> torch.Tensor:
        """Generated answer tokens [B, T] padded with <pad> (generate), or the chosen option [B, 1] (rank)."""
        inputs = batch["inputs"]
        if self.options.scoring == "rank":
            return self.rank_options(inputs).unsqueeze(1)
        tokenizer = self.backbone.tokenizer
        prompted = self.backbone.prompted(inputs)
        prompted.pop("position_ids", None)  # generate() derives positions from the mask
        generated = self.backbone.model.generate(
            **prompted,
            max_new_tokens=self.options.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        # a causal model returns prompt + answer (the answer alone when given embeddings); an encoder-decoder its
        # decoder start token + answer
        start = 1 if self.backbone.is_encoder_decoder else (0 if "inputs_embeds" in prompted else inputs["input_ids"].shape[1])
        return generated[:, start:]

    @torch.no_grad()
    def rank_options(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Index [B] of the option whose tokens have the highest summed log-likelihood after the prompt."""
        return self.option_log_likelihoods(inputs).argmax(1)

    @torch.no_grad()
    def option_log_likelihoods(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-likelihood [B, K] of each option's tokens (and end of sequence) after the prompt."""
        options = inputs["option_ids"]  # [B, K, T], -100 after each option's end
        batch, count, width = options.shape
        mask = options != IGNORE
        tokens = options.clamp(min=0)
        model = self.backbone.model
        if self.backbone.is_encoder_decoder:
            encoder_inputs = {key: inputs[key].repeat_interleave(count, 0) for key in ("input_ids", "attention_mask")}
            labels = options.reshape(batch * count, width)
            decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=labels.clamp(min=0))
            prompted = self.backbone.prompted(encoder_inputs)
            prompted.pop("position_ids", None)
            logits = model(**prompted, decoder_input_ids=decoder_inputs, use_cache=False).logits  # [B*K, T, V]
        else:
            prompt_width = inputs["input_ids"].shape[1]
            ids = torch.cat([inputs["input_ids"].repeat_interleave(count, 0), tokens.reshape(batch * count, width)], 1)
            attention = torch.cat([inputs["attention_mask"].repeat_interleave(count, 0), mask.reshape(batch * count, width).long()], 1)
            positions = (attention.cumsum(1) - 1).clamp(min=0)
            prompted = self.backbone.prompted({"input_ids": ids, "attention_mask": attention, "position_ids": positions})
            start = self.backbone.prompt_length() + prompt_width - 1  # input-prompt tokens come first
            logits = model(**prompted, use_cache=False).logits[:, start : start + width]  # [B*K, T, V]: each predicts an option token
        picked = logits.float().log_softmax(-1).gather(-1, tokens.reshape(batch * count, width, 1)).squeeze(-1)
        return (picked * mask.reshape(batch * count, width)).sum(1).reshape(batch, count)

    def decode(self, predictions: torch.Tensor) -> list[str]:
        """Generated token rows -> answer texts (cut at the end-of-sequence token)."""
        tokenizer = self.backbone.tokenizer
        texts = []
        for row in predictions.tolist():
            row = [int(token) for token in row]
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
        return texts

    def example_scores(self, predictions: torch.Tensor, batch: dict[str, Any], task: Task, scenario: str) -> dict[str, torch.Tensor]:
        """accuracy (exact match, or the right option under rank) and rouge_l per example [B]."""
        split = task.test if batch["example_keys"][0][1] == "test" else task.train
        references = [split.targets[key[2]] for key in batch["example_keys"]]
        if self.options.scoring == "rank":
            options = task_options(split, task)
            texts = [options[int(choice)] for choice in predictions[:, 0].tolist()]
        else:
            texts = self.decode(predictions)
        exact = [float(normalise_answer(text) == normalise_answer(ref)) for text, ref in zip(texts, references)]
        overlap = [rouge_l(text, ref) for text, ref in zip(texts, references)]
        return {"accuracy": torch.tensor(exact), "rouge_l": torch.tensor(overlap)}


def task_options(split: Split, task: Task) -> list[str]:
    """A label task's answer strings in class-id order (its options)."""
    if not task.options:
        raise ConfigError(f"task `{task.name}`: no options to rank")
    return task.options


__all__ = ["LanguageTaskModel", "normalise_answer", "rouge_l"]
