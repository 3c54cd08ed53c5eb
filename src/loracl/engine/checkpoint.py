"""Per-task checkpoints: OUT/<run>/checkpoints/task_<k>/ with safetensors tensors and a JSON record.

Each folder is written under a temporary name and renamed when complete, so a killed run never leaves
a half-written checkpoint that resume would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loracl.errors import CheckpointError

STATE_FILE = "state.safetensors"
BACKBONE_FILE = "backbone.safetensors"
RECORD_FILE = "record.json"


# train keys that change how a run goes but not its results: progress bars, and compiling (a run may resume with
# it switched on or off)
RESULT_NEUTRAL_TRAIN_KEYS = ("progress", "compile", "compile_backend")


def config_fingerprint(config_dict: dict[str, Any]) -> str:
    """A hash of everything that changes results (labels and RESULT_NEUTRAL_TRAIN_KEYS excluded)."""
    relevant = json.loads(json.dumps(config_dict, sort_keys=True))
    for key in RESULT_NEUTRAL_TRAIN_KEYS:
        relevant.get("train", {}).pop(key, None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def save_checkpoint(
    run_dir: Path,
    task_index: int,
    state: dict[str, torch.Tensor],
    record: dict[str, Any],
    backbone_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write task_<k>/ atomically (tensors, optional full backbone, record.json last)."""
    folder = run_dir / "checkpoints" / f"task_{task_index}"
    temporary = folder.with_name(f".task_{task_index}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(_contiguous(state), str(temporary / STATE_FILE))
    if backbone_state is not None:
        save_file(_contiguous(backbone_state), str(temporary / BACKBONE_FILE))
    (temporary / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The finished task_<k> folder with the highest k, if any."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    finished = []
    for child in root.iterdir():
        if child.name.startswith("task_") and (child / RECORD_FILE).is_file() and child.name[5:].isdigit():
            finished.append((int(child.name[5:]), child))
    return max(finished)[1] if finished else None


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's own files are unreadable (not a fingerprint mismatch): an earlier one may still serve."""


def read_checkpoint(folder: Path, fingerprint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Record, method tensors and optional backbone tensors; refuses a folder written by another config."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: malformed JSON or bytes that are not UTF-8
        raise CorruptCheckpoint(f"checkpoint {folder} is unreadable: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(record, dict):
        raise CorruptCheckpoint(f"checkpoint {folder}: {RECORD_FILE} is not a JSON object")
    if record.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {folder} was written by another config (fingerprint {record.get('fingerprint')}, "
            f"this run {fingerprint}); use a new --out directory or the original config"
        )
    try:
        state = load_file(str(folder / STATE_FILE))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CorruptCheckpoint(f"checkpoint {folder} has unreadable tensors: {str(exc).splitlines()[0][:160]}") from None
    backbone_file = folder.parent / "task_0" / BACKBONE_FILE
    try:
        backbone = load_file(str(backbone_file)) if backbone_file.is_file() else None
    except Exception as exc:
        raise CheckpointError(
            f"{backbone_file} (the base session's backbone, needed by every later task) is unreadable:"
            f" {str(exc).splitlines()[0][:160]}; delete the run folder to start again"
        ) from None
    return record, state, backbone


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """The finished task_<k> folders, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(child.name[5:]), child) for child in root.iterdir()
             if child.name.startswith("task_") and child.name[5:].isdigit() and (child / RECORD_FILE).is_file()]
    return [folder for _, folder in sorted(found, reverse=True)]
