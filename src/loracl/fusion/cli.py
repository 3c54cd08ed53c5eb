"""`loracl fuse`: read the task adapters and their examples, fuse, write a PEFT folder and fusion_report.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from loracl.adapters.fused import fold_part_pairs
from loracl.adapters.peft_io import write_peft_adapter
from loracl.config import apply_override, parse_override
from loracl.errors import DataError, LoraclError, read_json_file
from loracl.fusion import FUSION_METHODS, LoraHost, TaskAdapter, TaskSupport, fuse, fuse_options, read_adapter, read_run_branch


def read_examples(path: str | Path, count: int) -> list[str] | list[dict[str, str]]:
    """The first `count` examples of a JSON list or a JSONL file: texts (strings or {"text": ...}), or, for a
    language model, {"input": ..., "output": ...} pairs (an optional "instruction" heads the prompt)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"example file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})") from None
    try:
        items = json.loads(raw) if raw.startswith("[") else [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is neither a JSON list nor JSON lines: {exc.msg}") from None
    if not items:
        raise DataError(f"{path} holds no examples: fusion needs a few examples per task")
    if all(isinstance(item, dict) and isinstance(item.get("input"), str) and isinstance(item.get("output"), str) for item in items):
        return [{"input": item["input"], "output": item["output"], "instruction": str(item.get("instruction", ""))} for item in items[:count]]
    texts = [item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None for item in items]
    if any(not isinstance(text, str) for text in texts):
        raise DataError(
            f"{path}: every example must be a string, an object with a `text` string, or (a language model) an object"
            " with `input` and `output` strings"
        )
    return texts[:count]


def answer_support(backbone: Any, examples: list[dict[str, str]], name: str) -> TaskSupport:
    """Prompt + answer batches of a language model's examples, scored by the answer-only loss."""
    from loracl.backbones.language import LanguageBackbone
    from loracl.data.stream import Split, Task, prompt_header
    from loracl.task_models.language import LanguageTaskModel

    if not isinstance(backbone, LanguageBackbone):
        raise DataError(f"examples for `{name}` are input/output pairs, but the base model is not a language model: give texts")
    model = LanguageTaskModel(backbone)
    headers = [prompt_header(example["instruction"], []) if example["instruction"] else "Answer the input." for example in examples]
    split = Split([example["input"] for example in examples], [0] * len(examples), [example["output"] for example in examples], headers)
    task = Task(name, 0, [0], split, Split([], []), free_form=True)
    return TaskSupport(model.collate(split, list(range(len(examples))), task, True), answer_model=model)


def collect_adapters(args: argparse.Namespace) -> list[TaskAdapter]:
    adapters = [read_adapter(folder) for folder in args.adapters]
    if args.run:
        from loracl.engine.checkpoint import RECORD_FILE, latest_checkpoint

        folder = latest_checkpoint(Path(args.run))
        if folder is None:
            raise LoraclError(f"no finished checkpoint in {args.run}/checkpoints")
        record = folder / RECORD_FILE
        finished = int(read_json_file(record).get("task_index", -1)) + 1 if record.is_file() else 0
        try:
            indices = [int(part) for part in args.tasks.split(",")] if args.tasks else list(range(finished))
        except ValueError:
            raise LoraclError(f"--tasks {args.tasks!r}: give task indices separated by commas, e.g. 0,2") from None
        adapters += [read_run_branch(args.run, index) for index in indices]
    if len(adapters) < 1:
        raise LoraclError("give at least one adapter folder or --run")
    return adapters


def fuse_from_args(args: argparse.Namespace) -> Path:
    """The whole `loracl fuse` command; raises LoraclError on bad input."""
    if args.method not in FUSION_METHODS:
        raise LoraclError(f"unknown fusion method {args.method!r}: use one of {', '.join(FUSION_METHODS)}")
    data: dict[str, Any] = {}
    for text in args.set:
        path, value = parse_override(text)
        apply_override(data, path, value)
    options = fuse_options(data)
    out = Path(args.out)
    if str(args.out) in ("", ".") or (out.exists() and not out.is_dir()):
        raise LoraclError(f"--out {args.out!r}: name a new folder for the fused adapter")
    adapters = collect_adapters(args)
    host, supports = None, None
    if args.examples:
        if len(args.examples) != len(adapters):
            raise LoraclError(f"{len(args.examples)} --examples files for {len(adapters)} adapters: give one per adapter, in order")
        from loracl.backbones.registry import load_backbone

        base = args.base or adapters[0].base_model
        if not base:
            raise LoraclError("the adapters do not name their base model: give --base")
        # split the base model as the adapters' run did (their pairs name the parts); PEFT folders: unsplit
        layouts = adapters[0].layouts
        backbone = load_backbone(base, seed=0, split_fused={name: dict(layout) for name, layout in layouts.items()} if layouts else "off")
        host = LoraHost(backbone, sorted(adapters[0].pairs))
        supports = []
        for adapter, path in zip(adapters, args.examples):
            examples = read_examples(path, args.num_examples)
            if isinstance(examples[0], dict):  # a language model's instruction examples: the answer loss
                supports.append(answer_support(backbone, examples, adapter.name))
                continue
            if backbone.modality != "text":  # an examples file holds texts; images have no file format here
                raise DataError(
                    f"{path}: the examples are texts, but the base model `{base}` reads {backbone.modality}s: give"
                    " text examples only for a text or language model (an image model's adapters fuse without examples,"
                    " e.g. --method linear)"
                )
            inputs = backbone.collate(examples)
            host.set_adapter(adapter.pairs)
            with torch.no_grad():  # label-free: the fused LoRA should reproduce each task's own features
                supports.append(TaskSupport(inputs, target_features=host.features(inputs)))
    outcome = fuse(adapters, args.method, options, host=host, supports=supports)
    # fused per part; on disk one exact LoRA per fused layer, as the unsplit base model names it
    write_peft_adapter(fold_part_pairs(outcome.adapter, adapters[0].layouts), out, args.base or adapters[0].base_model)
    (out / "fusion_report.json").write_text(json.dumps(outcome.report, indent=2, default=str), encoding="utf-8")
    return out
