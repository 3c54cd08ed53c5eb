"""benchmarks/gpu_speed.py, the GPU benchmark against PEFT, runs end to end on tiny CPU models (so a lent GPU's
time goes to measuring, not debugging), refuses to pass a CPU run off as a GPU figure, and renders its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def gpu_speed():
    return load_script(BENCHMARKS / "gpu_speed.py", "gpu_speed_under_test")


def test_tiny_run_times_both_sides_on_every_model_with_the_same_trainable_parameters(gpu_speed, tmp_path: Path) -> None:
    out = tmp_path / "record.json"
    gpu_speed.main(["--tiny", "--batch", "2", "--rounds", "2", "--steps", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["setup"]["tiny"] and record["setup"]["device"] == "cpu" and "machine" in record
    assert set(record["rows"]) == {"vit-b16-224", "bert-base-128", "smollm2-135m-512"}
    for row in record["rows"].values():
        rate = row["train_samples_per_s"]
        assert row["train_ratio"] == pytest.approx(rate["loracl"] / rate["peft"])
        assert row["train_tokens_per_s"]["loracl"] == pytest.approx(rate["loracl"] * row["tokens_per_sample"])
        assert all(len(times) == 2 for times in row["round_s"].values())
        assert row["train_working_memory_gib"] == {"loracl": None, "peft": None}  # measured on CUDA only
        # counted FLOPs: a frozen-base LoRA step costs more than a forward and less than full fine-tuning's 3x
        assert 1.2 * row["flops_per_sample"]["eval"] < row["flops_per_sample"]["train"] < 3 * row["flops_per_sample"]["eval"]
    assert record["rows"]["vit-b16-224"]["tokens_per_sample"] == 5  # 2 x 2 patches of 16 px in 32 px, and CLS
    bert = record["rows"]["bert-base-128"]
    # embedding lookups are not matmuls: a forward costs well under 2 FLOPs per parameter per token here, where the
    # 1000 x 32 word embeddings are about half of the tiny BERT's parameters
    assert bert["flops_per_sample"]["eval"] < 1.5 * bert["parameters"] * bert["tokens_per_sample"]
    assert record["setup"]["peft"] and all(row["attention"] for row in record["rows"].values())


def test_the_lora_sides_train_only_their_adapters(gpu_speed) -> None:
    work = gpu_speed.bert(tiny=True)
    ours = gpu_speed.with_loracl_lora(work.build(), work.targets)
    theirs = gpu_speed.with_peft_lora(work.build(), work.targets)
    trained = [name for name, p in ours.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_the_real_run_is_refused(gpu_speed, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_speed.main(["--models", "vit"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_the_costs_section_shows_a_gpu_record_and_not_a_tiny_one(tmp_path: Path) -> None:
    costs = load_script(BENCHMARKS / "costs.py", "costs_gpu_under_test")
    row = {"train_samples_per_s": {"loracl": 1600.0, "peft": 1570.0}, "train_ratio": 1600 / 1570, "train_tokens_per_s": {"loracl": 315200.0},
           "eval_ratio": 1.031, "train_working_memory_gib": {"loracl": 9.5, "peft": 9.75},
           "mfu": {"train_loracl": 0.0923, "eval_merged": 0.14, "eval_bare": 0.145}}
    record = {"setup": {"device": "NVIDIA H200", "dtype": "bfloat16", "batch": 64, "rank": 8, "alpha": 16.0, "rounds": 5, "steps": 10,
                        "peak_tflops": 989.0, "tiny": False, "peft": "0.21.2"},
              "reference": {"device": "NVIDIA H100", "peft": "0.21", "vit-b16-224": {"train": 1570, "merged_eval": 6124, "bare_eval": 6480}},
              "train_target": 1.0, "eval_target": 1.02, "rows": {"vit-b16-224": row, "smollm2-135m-512": row},
              "machine": "x86_64, 16 threads, cuda", "versions": {}, "commit": "abc", "date": "2031-01-01 00:00 UTC"}
    (tmp_path / "gpu_speed.json").write_text(json.dumps(record))
    text = "\n".join(costs.costs_section(tmp_path))
    assert "| vit-b16-224 | 1,600 / 1,570 | 1.019 (met) | 315,200 | 1.031 (not met) | 9.50 / 9.75 | 9.2% / 14.0% / 14.5% | 1,570 / 6,124 / 6,480 |" in text
    assert "| smollm2-135m-512 | 1,600 / 1,570 |" in text and text.count(" | - |") == 1  # no reference for the decoder
    assert "NVIDIA H200, bfloat16, PEFT 0.21.2, batch 64" in text and "ratio (target >= 1)" in text and "(target <= 1.02)" in text
    (tmp_path / "gpu_speed.json").write_text(json.dumps({**record, "setup": {**record["setup"], "tiny": True}}))
    assert costs.costs_section(tmp_path) == []


def test_the_mfu_denominator_is_the_devices_own_peak(gpu_speed) -> None:
    assert gpu_speed.peak_for("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_speed.peak_for("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_speed.peak_for("NVIDIA GeForce RTX 4090", 165.0) == 165.0
    with pytest.raises(SystemExit, match="give --peak-tflops"):
        gpu_speed.peak_for("NVIDIA GeForce RTX 4090", None)
