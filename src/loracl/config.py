"""Typed run configuration: YAML in, validated pydantic models out, one clear error per bad key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from loracl.errors import ConfigError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _to_float(value: Any) -> Any:
    """Accept ints and numeric strings such as `1e-3` (YAML 1.1 reads that as a string); reject the rest."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


Float = Annotated[float, BeforeValidator(_to_float)]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
    # keys added after runs were written, left out of a run's fingerprint while they hold the value that keeps the
    # old behaviour (so those runs still resume); a changed value changes the fingerprint
    inert_defaults: ClassVar[dict[str, Any]] = {}

    def fingerprint_dump(self) -> dict[str, Any]:
        """The values that decide results, as JSON: model_dump without inert defaults, nested sections alike."""
        dumped = self.model_dump(mode="json")
        for key, value in self.inert_defaults.items():
            if getattr(self, key) == value:
                dumped.pop(key, None)
        for key in type(self).model_fields:
            value = getattr(self, key)
            if isinstance(value, StrictModel) and key in dumped:
                dumped[key] = value.fingerprint_dump()
        return dumped


class BackboneConfig(StrictModel):
    name: str = Field(default="minilm-l6", description="The backbone: a registry name, a Hugging Face id, or a local directory.")
    pooling: Literal["auto", "mean", "cls"] = "auto"
    local_files_only: bool = Field(
        default=True, description="Load the backbone from local files only: never reach a hub unless the user asks for it."
    )
    split_fused: Literal["auto", "off"] | dict[str, list[str] | dict[str, int]] = Field(
        default="auto",
        description="Fused projections split into named parts that methods can target (adapters/fused.py): `auto` (a `qkv` / "
        "`Wqkv` / `qkv_proj` with out = 3 × in becomes q, k, v), `off`, or {module: [parts]} / {module: {part: rows}}.",
    )

    # a model without fused projections is the same under "auto": runs made before the key existed still resume
    inert_defaults: ClassVar[dict[str, Any]] = {"split_fused": "auto"}


class StreamConfig(StrictModel):
    source: Literal["json_dir", "hf", "digits", "image_folder", "packaged", "packaged_instruct"] = "packaged"
    path: str | None = None
    tasks: list[str] | None = None
    scenario: Literal["class_incremental", "domain_incremental", "task_incremental"] = "class_incremental"
    label_space: Literal["per_task", "by_name"] = "per_task"
    max_train_per_task: int | None = Field(default=None, ge=1)
    max_test_per_task: int | None = Field(default=None, ge=1)
    shuffle_task_order: bool = False
    max_tasks: int | None = Field(default=None, ge=1, description="Keep only the first N tasks (after ordering).")
    classes_per_task: int = Field(default=2, ge=1, description="Classes per task, for sources without named tasks (digits).")
    test_fraction: Float = Field(default=0.2, gt=0.0, lt=1.0, description="Share of examples held out for testing, for sources without a test split.")
    text_column: str = Field(default="text", description="The `hf` source's text column.")
    label_column: str = Field(default="label", description="The `hf` source's label column.")
    image_size: int | None = Field(default=None, ge=1, description="The `image_folder` source's expected image side length.")


class HeadConfig(StrictModel):
    type: Literal["linear", "cosine", "prototype"] = "linear"
    metric: Literal["cosine", "euclidean"] = Field(default="cosine", description="Prototype head only: the distance to the class means.")
    cosine_scale: Float = Field(
        default=16.0, gt=0.0, description="Cosine head only: logits = scale · cos. Source: our design (not in the paper or code)."
    )
    freeze_old: bool = Field(default=True, description="Earlier tasks' head rows stop training when a new task begins.")
    loss_scope: Literal["current_task", "seen"] = Field(
        default="current_task", description="The classes the training loss sees: the current task's, or every class seen so far."
    )
    align: bool = Field(
        default=False,
        description="Classifier alignment (backbones/alignment.py): after every task but the first, re-train all head rows on "
        "pseudo-features from per-class Gaussians stored when each class was learned. Source: our design (not in the paper or code).",
    )
    align_epochs: int = Field(default=50, ge=1, description="Classifier alignment: epochs. Source: official code (LoRAC-IPC's TAP).")
    align_lr: Float = Field(default=0.005, gt=0.0, description="Classifier alignment: learning rate. Source: official code (LoRAC-IPC's TAP).")
    align_centroids: int = Field(
        default=10,
        ge=1,
        description="Classifier alignment: k-means clusters per class, each a diagonal Gaussian. Source: official code (LoRAC-IPC's TAP).",
    )
    align_samples_per_cluster: int = Field(
        default=320, ge=1, description="Classifier alignment: pseudo-features drawn per cluster. Source: official code (LoRAC-IPC's TAP)."
    )

    @model_validator(mode="after")
    def _align_needs_a_trained_head(self) -> HeadConfig:
        if self.align and self.type == "prototype":
            raise ValueError("head.align re-trains a linear or cosine head; the prototype head has nothing to align")
        return self


class TaskModelConfig(StrictModel):
    """What turns the backbone into answers: a classifier head, or a language model's generated text."""

    kind: Literal["auto", "classifier", "language"] = Field(
        default="auto",
        description="`language` for text in, text out (causal or encoder-decoder LMs); `classifier` for a class "
        "head over pooled features; `auto` picks language for generative models, classifier otherwise.",
    )
    scoring: Literal["generate", "rank"] = Field(
        default="generate",
        description="Language models: `generate` = greedy decoding, exact match after normalising case and "
        "whitespace (the O-LoRA / OA-Adapter papers' metric); `rank` = the option with the highest log-likelihood "
        "(label tasks only).",
    )
    max_new_tokens: int = Field(default=16, ge=1, description="Language models: the longest generated answer.")
    max_answer_tokens: int = Field(
        default=48, ge=1, description="Language models: the longest training answer; a longer one is a data error."
    )
    chat_template: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Language models: wrap the prompt in the tokenizer's chat template (`auto`: when it has one; "
        "`on` refuses a tokenizer without one).",
    )


class TrainConfig(StrictModel):
    epochs: int = Field(default=1, ge=0)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    lr: Float = Field(default=1.0e-3, gt=0.0, le=10.0, description="Learning rate of the adapters (at most 10: a larger value is a typo).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="Learning rate within each task: `constant`, or `cosine` from lr to 0 over the task's optimizer steps, no "
        "warm-up (FM-LoRA's protocol); multiplies any per-epoch factor a method applies (InfLoRA's code schedules).",
    )
    head_lr: Float | None = Field(default=None, gt=0.0, le=10.0, description="Learning rate of the classifier head; null: train.lr.")
    weight_decay: Float = Field(default=0.0, ge=0.0)
    max_length: int = Field(default=128, ge=2)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_grad_norm: Float | None = Field(default=1.0, gt=0.0)
    base_session_epochs: int = Field(default=0, ge=0, description="Above 0: task 0 first trains the whole backbone for this many epochs.")
    eval_next_task: bool = Field(
        default=False,
        description="Score each task once before training it (a[j−1][j]) and on the initial model (b[j]), for forward "
        "transfer; only tasks whose classes the model already knows can be scored (domain-incremental streams, shared "
        "label names).",
    )
    base_session_lr: Float = Field(default=1.0e-3, gt=0.0, le=10.0, description="Learning rate of the base session (whole backbone).")
    deterministic: bool = False
    progress: bool = True
    cpu: bool = Field(default=False, description="Force the CPU even when an accelerator is present.")
    compile: bool = Field(
        default=False,
        description="Run the backbone's transformer blocks, the adapters injected into them included, through "
        "torch.compile (backbones/compiled.py): the same results, faster steps once compiled; calls with hooks or a "
        "key/value cache (generation) stay eager. A speed switch: not in the run's fingerprint. It raises dynamo's "
        "process-wide recompile limit to 128 (docs/distributed.md). Source: our design.",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        default="inductor",
        description="train.compile's backend: `inductor` (generated kernels; on the CPU it needs a C++ compiler), "
        "`aot_eager` (traced forward and backward graphs run by the eager kernels: cheap to compile, no speed-up, "
        "what the tests use), `eager` (dynamo's tracing alone). Source: torch.compile's backends.",
    )

    inert_defaults: ClassVar[dict[str, Any]] = {"lr_schedule": "constant"}  # runs made before it existed resume

    @model_validator(mode="after")
    def _backend_needs_compile(self) -> TrainConfig:
        if self.compile_backend != "inductor" and not self.compile:
            raise ValueError("train.compile_backend has an effect only with train.compile: true")
        return self



class MethodConfig(StrictModel):
    """One method entry: its registry name, an optional label and head, and its own knobs."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str
    label: str | None = None
    head: HeadConfig | None = None

    @model_validator(mode="after")
    def _check_method_options(self) -> MethodConfig:
        from loracl.methods.registry import method_options_class

        options_cls = method_options_class(self.name)  # raises ConfigError naming the method
        try:
            options_cls.model_validate(self.model_extra or {})
        except ValidationError as exc:
            raise ValueError(_format_validation_error(exc, f"method `{self.name}`")) from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The method's own knobs, validated and defaulted."""
        from loracl.methods.registry import method_options_class

        return method_options_class(self.name).model_validate(self.model_extra or {})

    @property
    def run_label(self) -> str:
        """A folder-safe name for this entry's run."""
        if self.label:
            return self.label
        if self.head is None:
            return self.name
        return f"{self.name}+{self.head.type}" + ("+align" if self.head.align else "")


class RunConfig(StrictModel):
    seed: int = 0
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    task_model: TaskModelConfig = Field(default_factory=TaskModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: list[MethodConfig] = Field(default_factory=lambda: [MethodConfig(name="seq_lora")])

    @field_validator("method", mode="before")
    @classmethod
    def _single_method_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return [value]
        return value

    @model_validator(mode="after")
    def _labels_unique(self) -> RunConfig:
        labels = [entry.run_label for entry in self.method]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"method labels must be unique, repeated: {duplicates} (set `label:`)")
        if not self.method:
            raise ValueError("method: at least one method is needed")
        return self

    def head_for(self, entry: MethodConfig) -> HeadConfig:
        """The head a method entry uses: its own override, else the run's."""
        return entry.head if entry.head is not None else self.head


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the first offending key, its value problem, and where it came from."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown config key `{location}`"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = first["msg"].removeprefix("Value error, ")
    if location:
        return f"{source}: config key `{location}`: {message}{shown}"
    return f"{source}: {message}"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1} column {mark.column + 1}" if mark is not None else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({yaml_problem(exc)})") from None
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set data[path[0]][path[1]]... = value; `method.X` applies to every method entry."""
    node: Any = data
    for index, part in enumerate(path[:-1]):
        if isinstance(node, list):
            for item in node:
                apply_override(item, path[index:], value)
            return
        if part == "method" and isinstance(node.get(part), dict):
            node[part] = [node[part]]
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {'.'.join(path)}: `{part}` is not a mapping")
        node = child
    if isinstance(node, list):
        for item in node:
            item[path[-1]] = value
        return
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Read a YAML config (or the embedded quickstart when path is None), apply --set overrides, validate."""
    if path is None:
        from loracl.resources import quickstart_config_text

        source = "quickstart config"
        text = quickstart_config_text()
    else:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text) if base is None else copy.deepcopy(base)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({yaml_problem(exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of config keys")
    for override in overrides or []:
        key_path, value = parse_override(override)
        apply_override(data, key_path, value)
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict into a RunConfig, raising ConfigError with one clear line."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A JSON-safe dict of the config, method knobs included."""
    data = config.model_dump(mode="json")
    return data
