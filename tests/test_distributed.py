"""Two processes through `accelerate launch --num_processes 2` on CPU (gloo) on a tiny model: the parameters are
identical on both ranks before every step, the accuracy matrix equals a one-process run with the same global batch,
only the main process writes, and a killed two-process run resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "distributed_worker.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA: torchrun starts two processes
    and the engine's Accelerator (cpu) joins them over gloo (accelerate's own --cpu flag needs MPI for several)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(WORKER), str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    finished = launch(out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out


def test_parameters_are_identical_on_both_ranks_before_every_step(two_process_run: Path) -> None:
    rank0 = json.loads((two_process_run / "rank0.json").read_text())
    rank1 = json.loads((two_process_run / "rank1.json").read_text())
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["digests"] and rank0["digests"] == rank1["digests"]
    assert len(set(rank0["digests"])) > len(rank0["digests"]) // 2  # the parameters did move between steps


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import distributed_worker

    from loracl.engine import run_experiment

    [single] = run_experiment(distributed_worker.config(), tmp_path, stream=distributed_worker.stream())
    two = json.loads((two_process_run / "rank0.json").read_text())["matrix"]
    # the same batches and averaged gradients; only the order of float sums differs: allow one test example per cell
    tolerance = 1 / 8 + 1e-9
    for row_two, row_one in zip(two, single.accuracy_matrix):
        for a, b in zip(row_two, row_one):
            assert (a is None and b is None) or abs(a - b) <= tolerance, (two, single.accuracy_matrix)


def test_only_the_main_process_writes(two_process_run: Path) -> None:
    run_dir = two_process_run / "run" / "inc_lora"
    assert (run_dir / "results.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["task_0", "task_1", "task_2"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(two_process_run: Path, tmp_path: Path) -> None:
    killed = launch(tmp_path, "0")  # killed right after task 0's checkpoint
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "run" / "inc_lora" / "checkpoints").iterdir()) == ["task_0"]
    resumed = launch(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((two_process_run / "rank0.json").read_text())["matrix"]
    assert json.loads((tmp_path / "rank0.json").read_text())["matrix"] == expected


CLASSIFIER_METHODS = ["seq_lora", "inc_lora", "joint", "o_lora", "inflora", "sd_lora", "oa_adapter", "lorac_ipc", "fm_lora", "metalora", "icm_fusion", "probe"]


def test_every_classifier_method_trains_under_two_processes_with_identical_parameters(tmp_path: Path) -> None:
    from loracl.methods.registry import available_methods, method_class

    assert set(CLASSIFIER_METHODS) == {name for name in available_methods() if "classifier" in method_class(name).task_models}
    finished = launch(tmp_path, "-1", ",".join(CLASSIFIER_METHODS))
    assert finished.returncode == 0, finished.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["digests"] == rank1["digests"]
    trained = {digest.split(":")[0] for digest in rank0["digests"]}
    assert trained == set(CLASSIFIER_METHODS) - {"probe"} | ({"probe"} if any(d.startswith("probe:") for d in rank0["digests"]) else set())
    assert rank0["matrices"] == rank1["matrices"]


def test_lorac_ipc_default_importance_is_refused_under_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator
    from helpers import tiny_config, tiny_text_stream

    from loracl.engine.runner import MethodRun
    from loracl.errors import ConfigError

    config = tiny_config("lorac_ipc")
    run = MethodRun(config, config.method[0], tiny_text_stream(2, train=4, test=2), None)
    method = run.build()
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ConfigError, match="ipc_importance: lora_factors"):
        run.check_distribution(method)
