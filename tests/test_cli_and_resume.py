"""The command line end to end, bad input (exit 2, one line, nothing half-written), and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config, tiny_text_stream

from loracl.cli import main
from loracl.engine import run_experiment
from loracl.engine import runner as runner_module

TINY = {
    "seed": 0,
    "backbone": {"name": "tiny-vit"},
    "stream": {"source": "digits", "max_tasks": 3, "max_train_per_task": 40, "max_test_per_task": 20},
    "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "progress": False, "base_session_epochs": 1},
    "method": [{"name": "seq_lora"}, {"name": "probe", "head": {"type": "prototype"}}],
}


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_run_three_task_stream_then_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, TINY)), "--out", str(out), "--set", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy matrix: seq_lora" in printed and "forgetting" in printed
    summary = json.loads((out / "results.json").read_text())
    assert [run["label"] for run in summary["runs"]] == ["seq_lora", "probe+prototype"]
    assert all(len(run["accuracy_matrix"]) == 3 for run in summary["runs"])
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert main(["list"]) == 0
    assert "seq_lora" in capsys.readouterr().out


def test_export_of_a_run_loads_in_peft_with_identical_features(tmp_path, capsys):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from loracl.backbones.registry import load_backbone
    from loracl.config import validate_config
    from loracl.data.build import load_stream

    config = validate_config(dict(TINY, method=[{"name": "inc_lora"}]))
    out = tmp_path / "out"
    [result] = run_experiment(config, out, stream=load_stream(config.stream))
    assert main(["export", str(out / "inc_lora"), "--out", str(tmp_path / "peft")]) == 0
    backbone = load_backbone("tiny-vit", seed=0)
    backbone.load_state_dict(load_file(str(out / "inc_lora" / "checkpoints" / "task_0" / "backbone.safetensors")))
    peft_model = PeftModel.from_pretrained(backbone.model, str(tmp_path / "peft")).eval()
    pixels = torch.rand(4, 1, 8, 8)
    device = next(result.method.model.parameters()).device
    ours = result.method.model.backbone.model(pixel_values=pixels.to(device)).last_hidden_state.cpu()
    theirs = peft_model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert main(["export", str(out / "inc_lora"), "--task", "7", "--out", str(tmp_path / "x")]) == 2
    assert "no finished checkpoint for task 7" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, culprit",
    [
        ({"trian": {}}, "unknown config key `trian`"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"method": {"name": "nope"}}, "unknown method 'nope'"),
        ({"stream": {"source": "json_dir", "path": "/no/such/dir"}}, "data directory not found: /no/such/dir"),
        ({"backbone": {"name": "tiny-bert"}}, "image inputs but the backbone `tiny-bert` is a text model"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, change, culprit):
    data = {**TINY, **change}
    out = tmp_path / "out"
    code = main(["run", str(write_config(tmp_path, data)), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2
    assert culprit in error and "Traceback" not in error and error.count("\n") == 1
    assert not out.exists()  # nothing written, not even a run.log


def test_errors_found_by_the_engine_leave_no_output_folder_behind(tmp_path, capsys):
    """Errors raised after OUT was created (entry checks, data loading) remove this call's run.log and OUT."""
    data = {**TINY, "method": [{"name": "seq_lora"}, {"name": "lorac_ipc", "head": {"type": "linear", "align": True}}]}
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, data)), "--out", str(out)]) == 2
    assert "head.align" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(write_config(tmp_path, data)), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # a user's folder is kept, our log is not


@pytest.mark.parametrize(
    "bad_entry, culprit",
    [
        ({"name": "inc_lora", "target_modules": ["qeury"]}, "target_modules ['qeury'] matched no module"),
        ({"name": "fm_lora", "prompt_depth": "deep", "prompt_len": 2, "prompt_layers": 9}, "prompt_layers 9 exceeds the 2"),
    ],
)
def test_errors_only_the_model_reveals_come_before_any_training(tmp_path, capsys, monkeypatch, bad_entry, culprit):
    """A later entry whose targets or prompt do not fit the backbone is refused before the first entry's base
    session trains: exit 2, one line, no output folder."""

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the entries were checked against the model")

    monkeypatch.setattr(runner_module.MethodRun, "base_session", no_training)
    data = {**TINY, "method": [{"name": "seq_lora"}, bad_entry]}
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, data)), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert culprit in error and error.count("\n") == 1
    assert not out.exists()


def test_output_directory_not_writable(tmp_path, capsys):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"
        blocked.write_text("x")  # a file where a directory must go: fails even for root
        target = blocked / "out"
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    assert main(["run", str(write_config(tmp_path, TINY)), "--out", str(target)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_checkpoint_from_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    config = dict(TINY, method=[{"name": "seq_lora"}])
    assert main(["run", str(write_config(tmp_path, config)), "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    assert main(["run", str(write_config(tmp_path, config)), "--out", str(out), "--set", "train.lr=0.5"]) == 2
    assert "written by another config" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_checkpoint_whose_tensors_do_not_fit_is_refused_by_name(tmp_path, capsys):
    """A checkpoint of the same config whose tensor names this version does not build (an older layout, a
    hand-edited file): exit 2 naming the folder, the earlier results left as they were."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    config = dict(TINY, method=[{"name": "seq_lora"}])
    assert main(["run", str(write_config(tmp_path, config)), "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    checkpoints = out / "seq_lora" / "checkpoints"
    state_file = checkpoints / "task_1" / "state.safetensors"
    state = load_file(state_file)
    state["renamed." + next(iter(state))] = state.pop(next(iter(state)))
    save_file(state, state_file)
    for later in sorted(checkpoints.iterdir())[2:]:  # task_1 becomes the latest checkpoint
        for file in later.iterdir():
            file.unlink()
        later.rmdir()
    capsys.readouterr()
    assert main(["run", str(write_config(tmp_path, config)), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "task_1 does not fit method `seq_lora`" in error and "Traceback" not in error
    assert (out / "results.json").read_bytes() == before


def test_real_entry_point_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loracl.cli", "run", "--set", "train.lr=fast", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "train.lr" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("method", ["inc_lora"])
def test_resume_after_interruption_gives_the_same_matrix(tmp_path, monkeypatch, method):
    stream = tiny_text_stream(3)
    config = tiny_config(method, train={"deterministic": True, "epochs": 2})
    [uninterrupted] = run_experiment(config, tmp_path / "a", stream=stream)

    original = runner_module.MethodRun._run_task

    def crash_on_last_task(self, method_object, task, base_session):
        if task.index == 2:
            raise KeyboardInterrupt
        return original(self, method_object, task, base_session)

    monkeypatch.setattr(runner_module.MethodRun, "_run_task", crash_on_last_task)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "b", stream=stream)
    assert sorted(p.name for p in (tmp_path / "b" / method / "checkpoints").iterdir()) == ["task_0", "task_1"]
    monkeypatch.setattr(runner_module.MethodRun, "_run_task", original)
    [resumed] = run_experiment(config, tmp_path / "b", stream=stream)
    assert resumed.accuracy_matrix == uninterrupted.accuracy_matrix
    assert resumed.results["stored_bytes_cumulative"] == uninterrupted.results["stored_bytes_cumulative"]
    # wall time counts the tasks of the interrupted session too, not only the resumed one
    task_walls = [record["wall_s"] for record in resumed.results["per_task"]]
    assert len(task_walls) == 3 and all(wall > 0 for wall in task_walls)
    assert resumed.results["wall_s"] >= sum(task_walls)
    [finished] = run_experiment(config, tmp_path / "b", stream=stream)  # nothing left to run
    assert finished.results["wall_s"] >= sum(task_walls)
