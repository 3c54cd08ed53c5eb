"""Error types: a LoraclError is bad user input, reported in one line (CLI exit code 2).

Also the one JSON reader every user-supplied file goes through, so a broken file always gives the same error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LoraclError(Exception):
    """Bad input from the user: a config key, a path, a label, a checkpoint. One clear message."""


class ConfigError(LoraclError):
    """A config key is unknown, mistyped or out of range."""


class DataError(LoraclError):
    """A data source is missing, empty or malformed."""


class CheckpointError(LoraclError):
    """A checkpoint folder does not belong to this run or cannot be read."""


class TrainingDiverged(LoraclError):
    """The loss stopped being a finite number; the finished tasks' checkpoints stay, the run can be rerun."""


class ExportRefused(LoraclError):
    """What a method serves cannot be written as the adapter format asked for (e.g. one PEFT LoRA)."""


class MissingDependencyError(LoraclError):
    """An optional package is needed for what the user asked for."""


def read_json_file(path: Path, error: type[LoraclError] = LoraclError) -> Any:
    """Parse a UTF-8 JSON file; a missing, unreadable or malformed file raises `error` naming it and the spot."""
    if not path.is_file():
        raise error(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
