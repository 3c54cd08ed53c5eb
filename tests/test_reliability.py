"""Bad input, faults and concurrent use, tried as a user would: one line naming the culprit, exit code 2, nothing
half-written, and the frozen weights read only from safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_digits_stream, tiny_text_stream

from loracl.backbones.registry import load_backbone
from loracl.cli import EXIT_BAD_INPUT, main
from loracl.engine import run_experiment
from loracl.errors import LoraclError, TrainingDiverged


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_config_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"seed: 0\nname: \xff\xfe\n")
    code, err = run_cli(["run", str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == EXIT_BAD_INPUT
    assert "not UTF-8" in err and str(config) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["file", "set"])
def test_invalid_yaml_is_reported_on_one_line_with_its_position(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: 0\ntrain: {epochs: 1\n" if where == "file" else "seed: 0\n")
    extra = [] if where == "file" else ["--set", "train={epochs: [1"]
    code, err = run_cli(["run", str(config), "--out", str(tmp_path / "out"), *extra], capsys)
    assert code == EXIT_BAD_INPUT
    assert "not valid YAML" in err and "line" in err and err.count("\n") == 1


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loracl.cli import _lock

    out = tmp_path / "out"
    out.mkdir()
    held = _lock(out)  # what a running `loracl run` holds
    config = tmp_path / "c.yaml"
    config.write_text("backbone: {name: tiny-bert}\nmethod: [{name: seq_lora}]\n")
    try:
        code, err = run_cli(["run", str(config), "--out", str(out)], capsys)
    finally:
        held.close()
    assert code == EXIT_BAD_INPUT
    assert "another loracl run is writing to" in err
    assert not (out / "run.log").exists()  # the refused run wrote nothing


def test_a_diverging_loss_stops_the_run_with_one_line_and_keeps_finished_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loracl.engine.runner as runner_module

    config = tiny_config("inc_lora")
    stream = tiny_text_stream(2, train=8, test=4)
    original = runner_module.MethodRun.train_task

    def poisoned(self, method, task, epochs, lr, description):  # noqa: ANN001, ANN202 - the runner's signature
        if task.index == 1:
            monkeypatch.setattr(method, "task_loss", lambda outputs, batch: torch.tensor(float("nan"), requires_grad=True))
        return original(self, method, task, epochs, lr, description)

    monkeypatch.setattr(runner_module.MethodRun, "train_task", poisoned)
    with pytest.raises(TrainingDiverged, match="the loss became nan"):
        run_experiment(config, tmp_path, stream=stream)
    assert (tmp_path / "inc_lora" / "checkpoints" / "task_0" / "record.json").is_file()


def _saved_tiny_bert(folder: Path) -> Path:
    backbone = load_backbone("tiny-bert", seed=0)
    backbone.model.save_pretrained(str(folder))
    return folder


def test_a_backbone_folder_with_truncated_safetensors_is_one_line(tmp_path: Path) -> None:
    folder = _saved_tiny_bert(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoraclError, match="cannot be read from a safetensors file") as error:
        load_backbone(str(folder))
    assert "\n" not in str(error.value)


def test_a_backbone_folder_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    folder = _saved_tiny_bert(tmp_path / "model")
    state = load_backbone("tiny-bert", seed=0).model.state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(LoraclError, match="pickled .bin weights are not loaded"):
        load_backbone(str(folder))


@pytest.mark.parametrize("case", ["negative task", "empty out", "out is a file", "record is a list", "no run folder"])
def test_export_bad_input_is_one_line_naming_the_culprit_and_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_experiment(tiny_config("inc_lora"), tmp_path / "run", stream=tiny_text_stream(2, train=8, test=4))
    run_dir = tmp_path / "run" / "inc_lora"
    argv = ["export", str(run_dir), "--out", str(tmp_path / "adapter")]
    if case == "negative task":
        argv += ["--task", "-5"]
        culprits = ["--task -5"]
    elif case == "empty out":
        argv[3] = ""
        culprits = ["--out"]
    elif case == "out is a file":
        (tmp_path / "adapter").write_text("x")
        culprits = [f"--out {tmp_path / 'adapter'}", "existing file"]
    elif case == "record is a list":
        (run_dir / "checkpoints" / "task_1" / "record.json").write_text(json.dumps([]))
        culprits = [str(run_dir / "checkpoints" / "task_1" / "record.json")]
    else:
        argv[1] = str(tmp_path / "missing")
        culprits = [f"{tmp_path / 'missing'} is not a run folder"]
    code, err = run_cli(argv, capsys)
    assert code == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1
    assert all(culprit in err for culprit in culprits), err
    if case != "out is a file":
        assert not (tmp_path / "adapter").exists()


def _inc_lora_run(tmp_path: Path) -> Path:
    run_experiment(tiny_config("inc_lora"), tmp_path / "run", stream=tiny_text_stream(3, train=8, test=4))
    return tmp_path / "run" / "inc_lora"


@pytest.mark.parametrize("damage", ["record not utf-8", "record is a list", "state truncated"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(damage: str, tmp_path: Path) -> None:
    run_dir = _inc_lora_run(tmp_path)
    expected = json.loads((run_dir / "results.json").read_text())["accuracy_matrix"]
    latest = run_dir / "checkpoints" / "task_2"
    if damage == "record not utf-8":
        (latest / "record.json").write_bytes(b"\xff\xfe{")
    elif damage == "record is a list":
        (latest / "record.json").write_text("[]")
    else:
        state = latest / "state.safetensors"
        state.write_bytes(state.read_bytes()[:64])
    [resumed] = run_experiment(tiny_config("inc_lora"), tmp_path / "run", stream=tiny_text_stream(3, train=8, test=4))
    assert resumed.accuracy_matrix == expected  # task 2 redone from task 1's checkpoint
    assert json.loads((latest / "record.json").read_text())["task_index"] == 2


def test_a_truncated_base_session_backbone_is_named_as_such(tmp_path: Path) -> None:

    config = tiny_config("seq_lora", "tiny-vit", train={"base_session_epochs": 1})
    stream = tiny_digits_stream(2, max_train=8, max_test=4)
    run_experiment(config, tmp_path, stream=stream)
    backbone = tmp_path / "seq_lora" / "checkpoints" / "task_0" / "backbone.safetensors"
    backbone.write_bytes(backbone.read_bytes()[:64])
    with pytest.raises(LoraclError, match="the base session's backbone"):
        run_experiment(config, tmp_path, stream=stream)


@pytest.mark.parametrize("case", ["tasks not numbers", "examples not utf-8", "out is a file"])
def test_fuse_bad_input_is_one_line_naming_the_culprit_and_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _inc_lora_run(tmp_path)
    argv = ["fuse", "--run", str(run_dir), "--method", "linear", "--out", str(tmp_path / "fused")]
    if case == "tasks not numbers":
        argv += ["--tasks", "a,b"]
        culprits = ["--tasks 'a,b'"]
    elif case == "examples not utf-8":
        bad = tmp_path / "e.json"
        bad.write_bytes(b"\xff\xfe[")
        argv = ["fuse", "--run", str(run_dir), "--tasks", "0", "--method", "icm", "--base", "tiny-bert", "--examples", str(bad)]
        argv += ["--out", str(tmp_path / "fused")]
        culprits = [f"{bad} is not UTF-8"]
    else:
        (tmp_path / "fused").write_text("x")
        culprits = [f"--out '{tmp_path / 'fused'}'"]
    code, err = run_cli(argv, capsys)
    assert code == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1
    assert all(culprit in err for culprit in culprits), err


def test_fuse_with_text_examples_for_an_image_model_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_experiment(tiny_config("inc_lora", backbone="tiny-vit"), tmp_path / "run", stream=tiny_digits_stream(2, max_train=8, max_test=4))
    examples = tmp_path / "e.json"
    examples.write_text(json.dumps(["a text", "another text"]))
    argv = ["fuse", "--run", str(tmp_path / "run" / "inc_lora"), "--tasks", "0,1", "--method", "icm", "--base", "tiny-vit"]
    argv += ["--examples", str(examples), "--examples", str(examples), "--out", str(tmp_path / "fused")]
    code, err = run_cli(argv, capsys)
    assert code == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and "e.json" in err and "tiny-vit" in err
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("damage", ["runs of an empty object", "string schema_version", "string in a matrix cell"])
def test_report_on_a_damaged_summary_is_one_line_naming_the_culprit_and_exit_2(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_experiment(tiny_config("seq_lora"), tmp_path, stream=tiny_text_stream(2, train=8, test=4))
    summary = json.loads((tmp_path / "results.json").read_text())
    if damage == "runs of an empty object":
        summary["runs"] = [{}]
        culprits = ["run 0 has no `label`"]
    elif damage == "string schema_version":
        summary["schema_version"] = "1"
        culprits = ["schema_version", "'1'"]
    else:
        summary["runs"][0]["accuracy_matrix"][0][0] = "high"
        culprits = ["run 0", "accuracy_matrix[0][0] is 'high'"]
    (tmp_path / "results.json").write_text(json.dumps(summary))
    code, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and str(tmp_path / "results.json") in err
    assert all(culprit in err for culprit in culprits), err


def test_an_absurd_learning_rate_is_a_config_error_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("backbone: {name: tiny-bert}\nmethod: [{name: seq_lora}]\n")
    code, err = run_cli(["run", str(config), "--set", "train.head_lr=1e39", "--out", str(tmp_path / "out")], capsys)
    assert code == EXIT_BAD_INPUT and "train.head_lr" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_weights_that_run_away_are_flagged_in_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loracl.engine.runner as runner_module

    original = runner_module.MethodRun.train_task

    def running_away(self, method, task, epochs, lr, description):  # noqa: ANN001, ANN202 - the runner's signature
        stats = original(self, method, task, epochs, lr, description)
        with torch.no_grad():
            method.trainable_parameters()[0].fill_(3e8)
        return stats

    monkeypatch.setattr(runner_module.MethodRun, "train_task", running_away)
    [result] = run_experiment(tiny_config("inc_lora"), tmp_path, stream=tiny_text_stream(2, train=8, test=4))
    warnings = result.results["per_task"][0].get("warnings", [])
    assert warnings and "diverged" in warnings[0]
    assert "diverged" in (tmp_path / "inc_lora" / "results.json").read_text()


def test_export_into_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _inc_lora_run(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be made inside a file, root or not
    code, err = run_cli(["export", str(run_dir), "--out", str(blocker / "adapter")], capsys)
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and "cannot write the adapter" in err
