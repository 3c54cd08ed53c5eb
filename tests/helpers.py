"""Tiny streams and configs for tests: synthetic text and sklearn digits, no network, no ../shared."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from loracl.backbones.classifier import ContinualClassifier
from loracl.backbones.registry import load_backbone
from loracl.config import HeadConfig, RunConfig, TrainConfig, validate_config
from loracl.data.sources.digits import load_digits_tasks
from loracl.data.stream import RawTask, Stream, Task, build_stream
from loracl.methods.base import Method, MethodContext
from loracl.methods.registry import create_method

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "ocean", "candle", "forest", "violet", "copper"]


def synthetic_text_tasks(num_tasks: int = 3, classes_per_task: int = 2, train: int = 24, test: int = 12, seed: int = 0) -> list[RawTask]:
    """Each class is marked by its own keyword inside random filler text, so a tiny model can learn it."""
    rng = np.random.default_rng(seed)
    filler = "abcdefghij"
    tasks = []
    for task_index in range(num_tasks):
        labels = [f"c{j}" for j in range(classes_per_task)]

        def sample(count: int) -> list[tuple[str, str]]:
            pairs = []
            for position in range(count):
                label_index = position % classes_per_task
                keyword = WORDS[(task_index * classes_per_task + label_index) % len(WORDS)]
                noise = "".join(rng.choice(list(filler), size=6))
                pairs.append((f"{noise} {keyword} {noise[::-1]}", labels[label_index]))
            return pairs

        tasks.append(RawTask(f"t{task_index}", labels, sample(train), sample(test)))
    return tasks


def tiny_text_stream(num_tasks: int = 3, scenario: str = "class_incremental", **kwargs: Any) -> Stream:
    return build_stream(synthetic_text_tasks(num_tasks, **kwargs), scenario=scenario)


def two_text_tasks() -> tuple[Task, Task]:
    """Two tiny synthetic text tasks (8 training, 4 test examples each), as the option-effect tests use them."""
    first, second = tiny_text_stream(2, train=8, test=4).tasks
    return first, second


def attached(name: str, seed: int = 0, **options: Any) -> Any:
    """A fresh tiny-bert classifier (max length 32) with method `name` attached, options as given, two tasks planned."""
    model = ContinualClassifier(load_backbone("tiny-bert", max_length=32, seed=0))
    context = MethodContext(HeadConfig(), TrainConfig(progress=False), seed=seed, num_tasks=2)
    method: Method = create_method(name, options, context)
    method.attach(model)
    return method


def text_batch(method: Method, task: Task, count: int = 4) -> dict[str, Any]:
    """The first `count` training examples of `task`, collated by the method's backbone, with labels and task ids."""
    return {
        "inputs": method.model.backbone.collate(task.train.inputs[:count]),
        "labels": torch.tensor(task.train.labels[:count]),
        "task_ids": torch.full((count,), task.index),
    }


def seeded(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A standard-normal tensor of `shape` from its own generator seeded with `seed`, times `scale`."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def tiny_digits_stream(num_tasks: int = 3, max_train: int = 40, max_test: int = 20) -> Stream:
    raw = load_digits_tasks(classes_per_task=2)[:num_tasks]
    return build_stream(raw, max_train_per_task=max_train, max_test_per_task=max_test, modality="image")


def tiny_config(method: Any = "seq_lora", backbone: str = "tiny-bert", **sections: Any) -> RunConfig:
    """A validated RunConfig for tiny models; `sections` override top-level keys (train={...}, head={...})."""
    entries = method if isinstance(method, list) else [method]
    entries = [{"name": entry} if isinstance(entry, str) else entry for entry in entries]
    data: dict[str, Any] = {
        "seed": 0,
        "backbone": {"name": backbone},
        "stream": {"source": "digits"} if backbone.endswith("vit") else {"source": "packaged"},
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3, "max_length": 32, "progress": False},
        "method": entries,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate_config(data)


def run_interrupted_then_resumed(
    config: RunConfig, out: Any, stream: Stream, monkeypatch: Any, crash_at: int = 2, before_checkpoint: bool = False
) -> Any:
    """Run until task `crash_at` starts (or, with before_checkpoint, until it trained and was evaluated but its
    checkpoint had not landed), a KeyboardInterrupt there, then run again on the same OUT; returns the resumed run's
    single result."""
    import pytest

    import loracl.engine.runner as runner_module
    from loracl.engine import run_experiment

    name = "checkpoint" if before_checkpoint else "_run_task"
    original = getattr(runner_module.MethodRun, name)

    def crash(self: Any, method: Any, task: Any, *rest: Any, **named: Any) -> None:
        if (task if before_checkpoint else task.index) == crash_at:  # checkpoint() gets the task's index
            raise KeyboardInterrupt
        original(self, method, task, *rest, **named)

    with monkeypatch.context() as patch:
        patch.setattr(runner_module.MethodRun, name, crash)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, out, stream=stream)
    [resumed] = run_experiment(config, out, stream=stream)
    return resumed


ALPHABETS = ["abcde", "klmno", "vwxyz"]


def separable_stream(scenario: str = "class_incremental", per_class: int = 4, seed: int = 0) -> Stream:
    """Three tasks written in disjoint alphabets, so frozen features tell the tasks apart (routing tests)."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for letters in ALPHABETS:

        def sample(count: int) -> list[tuple[str, str]]:
            pairs = []
            for position in range(count):
                picks = torch.randint(0, len(letters), (8,), generator=generator)
                text = "".join(letters[i] for i in picks)
                label = "yes" if position % 2 == 0 else "no"
                pairs.append(((text + letters[0]) if label == "yes" else (text + letters[-1] * 3), label))
            return pairs

        tasks.append(RawTask(f"t{len(tasks)}", ["yes", "no"], sample(2 * per_class), sample(per_class)))
    return build_stream(tasks, scenario=scenario)


def train_method_task(method: Any, task: Any, batches: Any, steps: int = 2, lr: float = 5e-2) -> None:
    """What the engine does for one task, in a few steps: begin, prepare, optimise task loss + extra loss with the
    gradient hooks, end. `batches(shuffle)` gives a fresh loader over the task's training split."""
    method.begin_task(task)
    method.prepare_task(task, batches(False))
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=lr)
    method.model.train_adapters()  # as the engine: backbone in eval mode, adapter dropout active
    for step, batch in enumerate(batches(True)):
        if step == steps:
            break
        logits = method.forward(batch)
        loss = method.task_loss(logits, batch)
        extra = method.extra_loss(batch, logits)
        (loss if extra is None else loss + extra).backward()
        method.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step()
    method.model.eval()
    method.end_task(task, batches(False))


@torch.no_grad()
def accuracy_by_hand(method: Any, task: Any, eval_batch_size: int = 16) -> float:
    """A class-incremental task's test accuracy recomputed beside the engine's evaluation loop (not through its tally,
    gathering or matrix bookkeeping): the method's predictions on the same batches, argmax against the labels."""
    from loracl.engine.loaders import SplitLoader

    model = method.model
    device = next(model.parameters()).device
    loader = SplitLoader(
        task.test, model.backbone, eval_batch_size, task.index, device=device, sort_by_length=True, split_name="test",
        task_name=task.name, collate=lambda split, indices: model.collate(split, indices, task, False),
    )
    model.eval()
    correct = 0
    for batch in loader:
        correct += int((method.predict(batch).argmax(dim=1) == batch["labels"]).sum())
    return correct / len(task.test)


def load_script(path: Path, name: str) -> ModuleType:
    """A script outside the package (benchmarks/*.py) imported as a module under `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
