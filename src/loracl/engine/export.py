"""A finished task of a run, rebuilt from its checkpoint, written as a PEFT LoRA folder (`loracl export`) or read
as one task's LoRA for fusion (`loracl fuse --run`). The method itself says what it serves and whether that is
one LoRA, so every method's scaling, magnitudes and served branches come out as they serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracl.adapters.peft_io import LoraPair, write_peft_adapter
from loracl.config import validate_config
from loracl.engine.checkpoint import RECORD_FILE, latest_checkpoint
from loracl.errors import CheckpointError, LoraclError, read_json_file
from loracl.methods.base import Method


def checkpoint_folder(run_dir: Path, task: int) -> Path:
    """task_<k> of a run (task < 0: the last finished), refusing what is not a finished checkpoint."""
    if task < -1:
        raise LoraclError(f"--task {task}: give a task index >= 0, or -1 for the last finished task")
    if not run_dir.is_dir():
        raise LoraclError(f"{run_dir} is not a run folder (expected OUT/<method label>)")
    folder = latest_checkpoint(run_dir) if task < 0 else run_dir / "checkpoints" / f"task_{task}"
    if folder is None or not (folder / RECORD_FILE).is_file():
        raise LoraclError(f"no finished checkpoint {'' if task < 0 else f'for task {task} '}in {run_dir}/checkpoints")
    return folder


def restore_run_method(run_dir: str | Path, task: int) -> tuple[Method, dict[str, Any]]:
    """The method of a run as it was after task `task` (-1: the last finished), on its rebuilt backbone."""
    from loracl.engine.runner import MethodRun, stream_from_structure

    folder = checkpoint_folder(Path(run_dir), task)
    record = read_json_file(folder / RECORD_FILE, CheckpointError)
    if not isinstance(record, dict) or not {"config", "method_label", "stream"} <= set(record):
        raise CheckpointError(
            f"{folder / RECORD_FILE} does not describe its run (written by an older loracl, or not a loracl record);"
            " rerun the config to export it"
        )
    config = validate_config(record["config"], source=str(folder / RECORD_FILE))
    entries = [entry for entry in config.method if entry.run_label == record["method_label"]]
    if not entries:
        raise CheckpointError(f"{folder / RECORD_FILE}: its config has no method labelled `{record['method_label']}`")
    stream = stream_from_structure(record["stream"])
    run = MethodRun(config, entries[0], stream, run_dir=None)
    method = run.build()
    run.restore(method, folder, base_session=config.train.base_session_epochs > 0)
    method.model.eval()
    return method, record


def export_run_task(run_dir: str | Path, task: int, out: str | Path) -> Path:
    """Write the LoRA a run served after task `task` (-1: the last finished) as a PEFT adapter folder."""
    out = Path(out)
    if str(out) in ("", "."):
        raise LoraclError("--out: name a new folder for the adapter")
    if out.exists() and not out.is_dir():
        raise LoraclError(f"--out {out} is an existing file; name a folder")
    method, record = restore_run_method(run_dir, task)
    pairs = method.lora_export()
    return write_peft_adapter(pairs, out, record.get("backbone_path"))


def read_run_task_lora(run_dir: str | Path, task: int) -> tuple[dict[str, LoraPair], dict[str, Any]]:
    """Task `task`'s own LoRA branch from the last checkpoint of a run, with that checkpoint's record."""
    method, record = restore_run_method(run_dir, -1)
    return method.task_lora(task), record
