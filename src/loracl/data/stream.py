"""Task and Stream: raw per-task examples turned into a scenario with global class ids."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loracl.errors import ConfigError, DataError

SCENARIOS = ("class_incremental", "domain_incremental", "task_incremental")
LABEL_SPACES = ("per_task", "by_name")


@dataclass
class RawTask:
    """A task as a source delivers it: label strings and (input, label string) pairs per split."""

    name: str
    labels: list[str]
    train: list[tuple[Any, str]]
    test: list[tuple[Any, str]]
    origin: str = ""  # file or dataset it came from, for error messages
    instruction: str | None = None  # what a language model is asked to do (None: a default from the labels)
    free_form: bool = False  # pairs are (input, answer text) with no label set; scored by exact match / ROUGE-L


@dataclass
class Split:
    """Inputs (strings or arrays) and their global class ids; for language models also each example's answer
    text and the header of its prompt (the task's instruction and options)."""

    inputs: list[Any]
    labels: list[int]
    targets: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    """One step of a stream: its global class ids and its train and test splits."""

    name: str
    index: int
    class_ids: list[int]
    train: Split
    test: Split
    free_form: bool = False
    options: list[str] = field(default_factory=list)  # the raw label strings, in class-id order (LM answers)


def default_instruction(labels: list[str]) -> str:
    """The instruction of a label task without an instruction.txt, built from its label names."""
    return f"Read the input and answer with exactly one of the options: {', '.join(labels)}."


def prompt_header(instruction: str, labels: list[str]) -> str:
    """The part of a language-model prompt shared by every example of a task: instruction, then options."""
    return instruction if not labels else f"{instruction}\nOptions: {', '.join(labels)}"


@dataclass
class Stream:
    """An ordered list of tasks over one global label space."""

    tasks: list[Task]
    class_names: list[str]
    scenario: str
    modality: str  # "text" or "image"
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def summary(self) -> dict[str, Any]:
        """What results.json records about the stream."""
        return {
            "description": self.description,
            "scenario": self.scenario,
            "modality": self.modality,
            "tasks": [task.name for task in self.tasks],
            "num_classes": self.num_classes,
            "train_sizes": [len(task.train) for task in self.tasks],
            "test_sizes": [len(task.test) for task in self.tasks],
            **self.metadata,
        }


def _subsample(pairs: list[tuple[Any, str]], limit: int | None, seed: int, salt: str) -> list[tuple[Any, str]]:
    """A deterministic per-(seed, task, split) random subset, kept in its original order."""
    if limit is None or len(pairs) <= limit:
        return list(pairs)
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    keep = np.sort(rng.choice(len(pairs), size=limit, replace=False))
    return [pairs[i] for i in keep]


def _free_form_task(
    raw: RawTask, position: int, where: str, max_train: int | None, max_test: int | None, seed: int
) -> Task:
    """A task of (input, answer text) pairs without classes: every label is -1, the answers are the targets."""
    splits = {}
    for split_name, pairs, limit in (("train", raw.train, max_train), ("test", raw.test, max_test)):
        if not pairs:
            raise DataError(f"{where}: the {split_name} split has no examples")
        empty = next((i for i, (_, answer) in enumerate(pairs) if not str(answer).strip()), None)
        if empty is not None:
            raise DataError(f"{where}: {split_name} example {empty} has an empty output")
        pairs = _subsample(pairs, limit, seed, f"{raw.name}/{split_name}")
        header = raw.instruction or "Answer the input."
        splits[split_name] = Split([x for x, _ in pairs], [-1] * len(pairs), [y for _, y in pairs], [header] * len(pairs))
    return Task(raw.name, position, [], splits["train"], splits["test"], free_form=True)


def _class_name(task: RawTask, label: str, scenario: str, label_space: str) -> str:
    if label_space == "by_name":
        return label
    if scenario == "domain_incremental":
        return f"#{task.labels.index(label)}"  # Split-MNIST convention: position within the task
    return f"{task.name}:{label}"


def build_stream(
    raw_tasks: list[RawTask],
    scenario: str = "class_incremental",
    label_space: str = "per_task",
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    seed: int = 0,
    shuffle_task_order: bool = False,
    modality: str = "text",
    description: str = "",
) -> Stream:
    """Validate raw tasks and assign global class ids by the scenario and label-space rules."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")
    if label_space not in LABEL_SPACES:
        raise ConfigError(f"unknown label_space {label_space!r}: use one of {', '.join(LABEL_SPACES)}")
    if not raw_tasks:
        raise DataError("the stream has no tasks")
    names = [task.name for task in raw_tasks]
    if len(set(names)) != len(names):
        raise DataError(f"task names repeat in the stream: {names}")
    order = list(range(len(raw_tasks)))
    if shuffle_task_order:
        order = list(np.random.default_rng(seed).permutation(len(raw_tasks)))
    class_names: list[str] = []
    class_index: dict[str, int] = {}
    tasks: list[Task] = []
    for position, raw_index in enumerate(order):
        raw = raw_tasks[raw_index]
        where = f"task `{raw.name}`" + (f" ({raw.origin})" if raw.origin else "")
        if raw.free_form:
            tasks.append(_free_form_task(raw, position, where, max_train_per_task, max_test_per_task, seed))
            continue
        if not raw.labels:
            raise DataError(f"{where}: no labels")
        empty = next((label for label in raw.labels if not label.strip()), None)
        if empty is not None:
            raise DataError(f"{where}: a label is empty ({raw.labels}); every label needs a name")
        if len(set(raw.labels)) != len(raw.labels):
            raise DataError(f"{where}: labels repeat: {raw.labels}")
        splits = {}
        for split_name, pairs, limit in (
            ("train", raw.train, max_train_per_task),
            ("test", raw.test, max_test_per_task),
        ):
            if not pairs:
                raise DataError(f"{where}: the {split_name} split has no examples")
            unknown = next((label for _, label in pairs if label not in raw.labels), None)
            if unknown is not None:
                raise DataError(f"{where}: {split_name} label {unknown!r} is not one of its labels {raw.labels}")
            pairs = _subsample(pairs, limit, seed, f"{raw.name}/{split_name}")
            splits[split_name] = pairs
        task_class_ids = []
        for label in raw.labels:
            name = _class_name(raw, label, scenario, label_space)
            if name not in class_index:
                class_index[name] = len(class_names)
                class_names.append(name)
            task_class_ids.append(class_index[name])
        label_to_id = {label: task_class_ids[i] for i, label in enumerate(raw.labels)}

        header = prompt_header(raw.instruction or default_instruction(raw.labels), raw.labels)

        def to_split(pairs: list[tuple[Any, str]]) -> Split:
            return Split(
                inputs=[x for x, _ in pairs],
                labels=[label_to_id[label] for _, label in pairs],
                targets=[label for _, label in pairs],
                headers=[header] * len(pairs),
            )

        train_split, test_split = to_split(splits["train"]), to_split(splits["test"])
        tasks.append(Task(raw.name, position, task_class_ids, train_split, test_split, options=list(raw.labels)))
    if scenario == "class_incremental" and label_space == "per_task":
        pass  # classes are disjoint by construction
    return Stream(tasks, class_names, scenario, modality, description)
