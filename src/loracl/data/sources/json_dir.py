"""The shared JSON layout: <root>/<task>/{labels.json, train.json, test.json}, examples {label, sentence}.

A task folder may also hold `instruction.txt` (what a language model is asked to do). A folder without
labels.json whose examples are {input, output} is a free-form task (answers scored by exact match and ROUGE-L)."""

from __future__ import annotations

from pathlib import Path

from loracl.data.stream import RawTask
from loracl.errors import DataError, read_json_file


def _read_examples(path: Path) -> list[tuple[str, str]]:
    data = read_json_file(path, DataError)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{\"label\", \"sentence\"}} objects")
    pairs = []
    for position, item in enumerate(data):
        if not isinstance(item, dict) or "label" not in item or "sentence" not in item:
            raise DataError(f"{path}: example {position} needs the keys \"label\" and \"sentence\"")
        if not isinstance(item["sentence"], str):
            raise DataError(f"{path}: example {position}: \"sentence\" must be a string")
        pairs.append((item["sentence"], str(item["label"])))
    return pairs


def _read_free_form(path: Path) -> list[tuple[str, str]]:
    data = read_json_file(path, DataError)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{\"input\", \"output\"}} objects")
    pairs = []
    for position, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not isinstance(item.get("output"), str):
            raise DataError(f"{path}: example {position} needs string values for \"input\" and \"output\"")
        pairs.append((item["input"], item["output"]))
    return pairs


def read_instruction(folder: Path) -> str | None:
    """The task's instruction.txt as stripped UTF-8 text, None when the file is absent."""
    path = folder / "instruction.txt"
    if not path.exists():
        return None
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; the instruction must be a plain text file") from None
    if not text or "\x00" in text:
        raise DataError(f"{path}: {'empty' if not text else 'holds NUL bytes'}; write the task's instruction as plain text")
    return text


def available_tasks(root: str | Path) -> list[str]:
    """Task folders under root (those with a labels.json, or a train.json of a free-form task)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        child.name for child in root.iterdir() if (child / "labels.json").is_file() or (child / "train.json").is_file()
    )


def load_json_dir(root: str | Path, tasks: list[str] | None = None) -> list[RawTask]:
    """Read the named tasks (all, alphabetically, when tasks is None) from a json_dir root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    names = tasks if tasks is not None else available_tasks(root)
    if not names:
        raise DataError(f"no tasks in {root}: expected <task>/labels.json, train.json, test.json")
    raw_tasks = []
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"task `{name}` not found in {root} (available: {', '.join(available_tasks(root)) or 'none'})")
        instruction = read_instruction(folder)
        if not (folder / "labels.json").is_file():
            raw_tasks.append(
                RawTask(
                    name=name,
                    labels=[],
                    train=_read_free_form(folder / "train.json"),
                    test=_read_free_form(folder / "test.json"),
                    origin=str(folder),
                    instruction=instruction,
                    free_form=True,
                )
            )
            continue
        labels = read_json_file(folder / "labels.json", DataError)
        if not isinstance(labels, list) or not all(isinstance(label, (str, int)) for label in labels):
            raise DataError(f"{folder / 'labels.json'}: expected a JSON list of label strings")
        raw_tasks.append(
            RawTask(
                name=name,
                labels=[str(label) for label in labels],
                train=_read_examples(folder / "train.json"),
                test=_read_examples(folder / "test.json"),
                origin=str(folder),
                instruction=instruction,
            )
        )
    return raw_tasks
