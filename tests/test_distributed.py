"""Two processes through `accelerate launch --num_processes 2` on CPU (gloo) on a tiny model: the parameters are
identical on both ranks before every step, the accuracy matrix and routing accuracy equal a one-process run with the
same global batch, each process evaluates a shard of the test examples and the gathered evaluation equals an
unsharded one exactly, only the main process writes, and a killed two-process run resumes to the uninterrupted
result."""

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
def two_process_run(methods_run: Path) -> Path:
    """The default inc_lora run, made by the same launch as methods_run (one launch fewer: about 10 s)."""
    return methods_run / "default"


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
    # routing accuracy of the last round (8 test examples per task), from counts gathered over both processes
    routing_two = json.loads((two_process_run / "rank0.json").read_text())["method_metrics"]["inc_lora"]
    routing_one = single.results["method_metrics"]
    assert routing_two.keys() == routing_one.keys() == {"routing_accuracy", "routing_accuracy_per_task"}
    assert abs(routing_two["routing_accuracy"] - routing_one["routing_accuracy"]) <= tolerance
    assert routing_two["routing_accuracy_per_task"].keys() == routing_one["routing_accuracy_per_task"].keys()
    for name, value in routing_one["routing_accuracy_per_task"].items():
        assert abs(routing_two["routing_accuracy_per_task"][name] - value) <= tolerance


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


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_methods")
    finished = launch(out, "-1", ",".join(CLASSIFIER_METHODS))
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out


def test_every_classifier_method_trains_under_two_processes_with_identical_parameters(methods_run: Path) -> None:
    from loracl.methods.registry import available_methods, method_class

    assert set(CLASSIFIER_METHODS) == {name for name in available_methods() if "classifier" in method_class(name).task_models}
    rank0 = json.loads((methods_run / "rank0.json").read_text())
    rank1 = json.loads((methods_run / "rank1.json").read_text())
    assert rank0["digests"] == rank1["digests"]
    trained = {digest.split(":")[0] for digest in rank0["digests"]}
    assert trained == set(CLASSIFIER_METHODS) - {"probe"} | ({"probe"} if any(d.startswith("probe:") for d in rank0["digests"]) else set())
    assert rank0["matrices"] == rank1["matrices"]
    assert evaluation_metrics(rank0["method_metrics"]) == evaluation_metrics(rank1["method_metrics"])


def evaluation_metrics(by_label: dict) -> dict:
    """The method metrics an evaluation counts (routing, TII, w/o-TII), per run label; not timings and the like."""
    return {label: {key: value for key, value in metrics.items() if "tii" in key or key.startswith("routing")} for label, metrics in by_label.items()}


@pytest.mark.parametrize("run", ["two_process_run", "methods_run", "language"])
def test_each_process_evaluates_a_shard_and_the_gathered_evaluation_is_exact(run: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue("methods_run" if run == "language" else run)
    rank0 = json.loads((out / "rank0.json").read_text())
    rank1 = json.loads((out / "rank1.json").read_text())
    if run == "language":  # zero_shot on a tiny Llama after the classifier methods, in the same launch
        rank0, rank1 = rank0["language"], rank1["language"]
    # every test example predicted by exactly one process; eval_samples (the records') counts both processes'
    total = rank0["eval_samples"]
    assert rank1["eval_samples"] == total and rank0["test_examples"] + rank1["test_examples"] == total
    # whole batches dealt out in turn: 3 + 3 + 2 examples -> 5 and 3 (two_process_run), 1 + 1 + 1 + 1 -> 2 and 2,
    # 1 + 1 -> 1 and 1 (language)
    share = 5 / 8 if run == "two_process_run" else 1 / 2
    assert rank0["test_examples"] == total * share and rank1["test_examples"] == total * (1 - share)
    assert evaluation_metrics(rank0["method_metrics"]) == evaluation_metrics(rank1["method_metrics"])
    routed = 0
    for label, evaluations in rank0["reevaluated"].items():
        sharded, unsharded = evaluations["sharded"], evaluations["unsharded"]
        # the run's last row is the sharded evaluation's; one process alone gets exactly the same numbers
        assert sharded["accuracies"] == [a for a in rank0["matrices"][label][-1] if a is not None]
        assert sharded["other_metrics"] == rank0["metric_rows"][label]
        assert sharded == unsharded, label  # accuracies, other metrics, samples, tallies' counts, method metrics: exactly
        other = rank1["reevaluated"][label]["sharded"]
        assert (other["accuracies"], other["samples"], other["counts"]) == (sharded["accuracies"], sharded["samples"], sharded["counts"])
        assert evaluation_metrics({label: other["metrics"]}) == evaluation_metrics({label: sharded["metrics"]})
        routed += "routing_accuracy" in sharded["metrics"] or sharded["metrics"].get("tii_accuracy") is not None
    # routing tallies gathered: inc_lora's routed_inference; MetaLoRA's and LoRAC-IPC's routers, LoRAC-IPC's w/o-TII counts
    assert routed == {"two_process_run": 1, "methods_run": 2, "language": 0}[run]
    if run == "language":  # ROUGE-L and the worker's per-example `position` metric, gathered
        rows = rank0["metric_rows"]["zero_shot"]
        assert set(rows) == {"rouge_l", "position"} and rows == rank1["metric_rows"]["zero_shot"]
        assert rows["position"] == [(1 / 3 + 1 / 4) / 2] * 3
    if run == "methods_run":
        assert "without_tii_accuracy_matrix" in rank0["reevaluated"]["lorac_ipc"]["sharded"]["metrics"]


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


def test_sharded_strategies_are_refused_in_one_line_naming_the_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from helpers import tiny_config, tiny_text_stream

    from loracl.engine.runner import MethodRun
    from loracl.errors import ConfigError

    config = tiny_config("seq_lora")
    run = MethodRun(config, config.method[0], tiny_text_stream(2, train=4, test=2), None)
    method = run.build()
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self, kind=kind: kind))
        with pytest.raises(ConfigError, match=f"accelerate strategy {kind.value}: not supported"):
            run.check_distribution(method)


def test_a_sharding_request_that_accelerate_dropped_on_the_cpu_is_named() -> None:
    from loracl.engine.runner import sharding_request_ignored

    assert sharding_request_ignored("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"}).startswith("FSDP was requested")
    assert "DeepSpeed" in sharding_request_ignored("NO", {"ACCELERATE_USE_DEEPSPEED": "1"})
    assert sharding_request_ignored("MULTI_CPU", {"ACCELERATE_USE_FSDP": "false"}) is None
    assert sharding_request_ignored("MULTI_CPU", {}) is None
    assert sharding_request_ignored("FSDP", {"ACCELERATE_USE_FSDP": "true"}) is None
