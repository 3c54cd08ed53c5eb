"""The fusion_lm page's verdict is derived from its seed records: the 0.90 target, the best other fusion by the
spread rule, the fusions ICM-Fusion's mean falls below, and how much of its LoRAs' variance the F-VAE reproduced."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fusion_lm.py"


@pytest.fixture(scope="module")
def fusion_lm():
    return load_script(SCRIPT, "fusion_lm_under_test")


def record(seed: int, normalised: dict[str, float], mse: float) -> dict:
    rows = {label: {"mean_normalised": value, "mean_accuracy": value / 2} for label, value in normalised.items()}
    icm_report = {"final_reconstruction_mse": mse, "final_target_mean_square": 1.0, "fusion_s": 100.0 + seed, "padded_length": 4096}
    rows["icm"]["fusion_s"] = icm_report["fusion_s"]
    return {"seed": seed, "rows": rows, "reports": {"icm": icm_report}, "icm_options": {"warm_start_steps": 20, "meta_steps": 5},
            "machine": "x86_64, 2 threads, cpu"}


def test_verdict_names_the_target_the_best_fusion_and_the_generator_fit(fusion_lm) -> None:
    seeds = [
        record(0, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.80, "ties": 0.95, "icm": 0.85}, 0.40),
        record(1, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.82, "ties": 0.97, "icm": 0.87}, 0.30),
        record(2, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.78, "ties": 0.93, "icm": 0.83}, 0.20),
    ]
    lines = fusion_lm.verdict(seeds)
    assert lines[0] == "- ICM-Fusion: 0.850 ± 0.020 of each task's own LoRA (target 0.90: not reached, beyond the spread)."
    assert "`ties`" in lines[1] and "-0.100" in lines[1] and "beyond the spread" in lines[1]
    assert "below 1 of the 2 other fusions (`ties`)" in lines[2]  # linear is below ICM, not above it
    assert lines[4] == "- Seed spread (standard deviation of the normalised accuracy): ICM-Fusion ±0.020, the other fusions ±0.020 to ±0.020."
    lines = lines[:4] + lines[5:]
    assert lines[4].startswith("- What stands in the way: the F-VAE after 20 warm-start and 5 meta steps")
    assert "0.300 ± 0.100" in lines[4] and "0.700 ± 0.100 of their variance, below 0.9, so what it decodes is a blurred LoRA" in lines[4]
    assert lines[5].startswith("- The whole ICM-Fusion") and "101.000 ± 1.000 s per fusion on x86_64, 2 threads, cpu (3 seed(s)" in lines[5]


def test_a_generator_that_fits_is_not_called_blurred_and_the_default_schedule_is_named(fusion_lm) -> None:
    seeds = [record(seed, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.80, "icm": 0.95}, 0.05) for seed in range(2)]
    for seed in seeds:
        seed["icm_options"] = {"meta_steps": 10}  # the warm start at its default
    [fit] = [line for line in fusion_lm.verdict(seeds) if "F-VAE after" in line]
    assert fit.startswith("- The F-VAE after 300 warm-start and 10 meta steps") and "blurred" not in fit


def test_a_seed_stopped_before_icm_finished_says_so_and_claims_nothing(fusion_lm) -> None:
    stopped = {"seed": 1, "rows": {"no_lora": {"mean_normalised": 0.3, "mean_accuracy": 0.1}}, "reports": {},
               "stopped_after_min": 40, "unfinished": ["icm"]}
    [line] = fusion_lm.verdict([stopped])
    assert "not measured" in line and "40 minutes" in line and "icm" in line


def test_a_seed_that_shared_the_cpu_counts_for_accuracy_and_not_for_time(fusion_lm) -> None:
    seeds = [
        record(0, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.80, "icm": 0.85}, 0.30),
        {**record(1, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.82, "icm": 0.87}, 0.30), "shared_cpu": True},
    ]
    seeds[1]["reports"]["icm"]["fusion_s"] = seeds[1]["rows"]["icm"]["fusion_s"] = 900.0  # slowed by the other work
    took = fusion_lm.verdict(seeds)[-1]
    assert "took 100.000 s per fusion" in took and "(1 seed(s) not flagged as sharing the CPU)" in took
    [icm_row] = [line for line in fusion_lm.fusion_table(seeds) if line.startswith("| icm |")]
    assert icm_row == "| icm | 2 | 0.860 ± 0.014 | 0.430 ± 0.007 | 100.000 |"


@pytest.mark.parametrize(("icm", "state"), [
    ([0.95, 0.97, 0.93], "reached beyond the spread"),
    ([0.82, 1.10], "the mean is above it and the spread (±0.198) crosses it: undecided"),
    ([0.85], "below it on one seed: undecided"),
])
def test_the_target_is_judged_by_the_spread_and_one_seed_decides_nothing(fusion_lm, icm: list[float], state: str) -> None:
    seeds = [record(seed, {"no_lora": 0.3, "own_lora": 1.0, "linear": 0.80, "icm": value}, 0.30) for seed, value in enumerate(icm)]
    lines = fusion_lm.verdict(seeds)
    assert lines[0].endswith(f"(target 0.90: {state}).")
    # the F-VAE's fit is named as what stands in the way only while the target is not reached beyond the spread
    assert any(line.startswith("- What stands in the way") for line in lines) == (state != "reached beyond the spread")
