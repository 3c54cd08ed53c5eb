"""docs/results.md's Costs section is rendered from the cost records (quickstart_time, peft_speed, fvae_cost JSON) alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import load_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MACHINE = {"machine": "x86_64, 2 threads, cpu", "versions": {"loracl": "0.1.0"}, "commit": "abc1234", "date": "2031-01-02 03:04 UTC"}


@pytest.fixture(scope="module")
def costs():
    return load_script(BENCHMARKS / "costs.py", "costs_under_test")


@pytest.fixture(scope="module")
def records():
    return load_script(BENCHMARKS / "records.py", "records_under_test")


def quickstart(wall_s: float) -> dict[str, Any]:
    """A fabricated quickstart_time.json record."""
    runs = [{"label": "probe", "avg_accuracy": 0.247, "forgetting": 0.2, "wall_s": 25.0},
            {"label": "joint", "avg_accuracy": 0.705, "forgetting": None, "wall_s": 56.0}]
    return {"wall_s": wall_s, "target_s": 300, "runs": runs, **MACHINE}


def peft_speed(train_ratio: float) -> dict[str, Any]:
    """A fabricated peft_speed.json record."""
    return {
        "setup": {"backbone": "minilm-l6", "rank": 8, "alpha": 16.0, "batch": 16, "length": 64, "steps": 5, "rounds": 15, "threads": 2},
        "train_samples_per_s": {"loracl": 23.3 * train_ratio, "peft": 23.3}, "train_ratio": train_ratio, "train_target": 1.0,
        "eval_ms_per_batch": {"merged": 214.5, "bare": 213.9}, "eval_ratio": 1.0028, "eval_target": 1.02,
        "fastest_round": {"train_ratio": 0.988, "eval_ratio": 1.005}, "round_s": {}, **MACHINE,
    }


def fvae_cost() -> dict[str, Any]:
    """A fabricated fvae_cost.json record."""
    rows = [{"target": "factors", "conv_divisor": 4, "values_per_lora": 73728, "padded_length": 73728, "parameters": 496037,
             "s_per_step": 0.44, "warm_start_min": 2.2},
            {"target": "delta", "conv_divisor": 16, "values_per_lora": 1769472, "padded_length": 1769472, "parameters": 724730,
             "s_per_step": 18.75, "warm_start_min": 93.7}]
    setup = {"modules": 12, "rank": 8, "batch": 16, "timed_steps": 3, "threads": 2, "warm_start_steps": 300}
    return {"setup": setup, "rows": rows, "delta_over_factors_length": 24.0, **MACHINE}


def write(folder: Path, name: str, record: dict[str, Any]) -> None:
    """Write a fabricated record as docs/results/<name>.json would be."""
    (folder / f"{name}.json").write_text(json.dumps(record))


@pytest.mark.parametrize(("wall_s", "verdict"), [(212.4, "met"), (318.0, "NOT met")])
def test_quickstart_line_shows_the_recorded_wall_time_against_the_target(costs, tmp_path: Path, wall_s: float, verdict: str) -> None:
    write(tmp_path, "quickstart_time", quickstart(wall_s))
    section = costs.costs_section(tmp_path)
    assert section[:2] == ["## Costs", ""]
    [line] = [line for line in section if line.startswith("**The embedded default run**")]
    assert f"{wall_s:.0f} s wall time end to end, target under 300 s: {verdict}." in line
    assert "probe 0.247, joint 0.705" in line
    assert "x86_64, 2 threads, cpu, 2031-01-02 03:04 UTC; `python benchmarks/quickstart_time.py`" in line


def test_no_record_renders_nothing_and_a_missing_record_renders_no_line(costs, tmp_path: Path) -> None:
    assert costs.costs_section(tmp_path) == []
    assert costs.several_processes_section(tmp_path) == []
    write(tmp_path, "fvae_cost", fvae_cost())
    text = "\n".join(costs.costs_section(tmp_path))
    assert "**F-VAE cost per training step**" in text
    assert "embedded default run" not in text and "Speed against PEFT" not in text


def test_peft_speed_table_from_the_record(costs, tmp_path: Path) -> None:
    write(tmp_path, "peft_speed", peft_speed(0.95))
    text = "\n".join(costs.costs_section(tmp_path))
    assert "| train samples/s, seq_lora vs PEFT LoRA | 22.1 | 23.3 (PEFT) | 0.950 | >= 1 | no |" in text
    assert "| eval time per batch, merged adapter vs bare model | 214.5 ms | 213.9 ms (bare) | 1.003 | <= 1.02 | yes |" in text
    assert "median of 15 interleaved rounds of 5 steps; x86_64, 2 threads, cpu, 2031-01-02 03:04 UTC; `python benchmarks/peft_speed.py`" in text


def test_fvae_cost_table_from_the_record(costs, tmp_path: Path) -> None:
    write(tmp_path, "fvae_cost", fvae_cost())
    text = "\n".join(costs.costs_section(tmp_path))
    assert "| target | conv widths / | values per LoRA | F-VAE parameters | s per step | min for 300 warm-start steps |" in text
    assert "| delta | 16 | 1,769,472 | 724,730 | 18.75 | 93.7 |" in text
    assert "`delta` is 24x longer than `factors`" in text and "`python benchmarks/fvae_cost.py`" in text


def test_records_render_in_a_fixed_order(costs, tmp_path: Path) -> None:
    for name, record in [("fvae_cost", fvae_cost()), ("peft_speed", peft_speed(1.1)), ("quickstart_time", quickstart(230.0))]:
        write(tmp_path, name, record)
    text = "\n".join(costs.costs_section(tmp_path))
    assert text.index("embedded default run") < text.index("Speed against PEFT") < text.index("F-VAE cost")


def test_a_written_record_carries_the_machine_stamp_and_is_what_the_section_reads(costs, records, tmp_path: Path) -> None:
    record = {key: value for key, value in quickstart(212.4).items() if key not in ("machine", "versions", "commit", "date")}
    path = records.write_record("quickstart_time", record, tmp_path)
    assert path == tmp_path / "quickstart_time.json"
    assert records.load_record("quickstart_time", tmp_path)["machine"] == records.machine()["machine"]
    assert any("212 s" in line for line in costs.costs_section(tmp_path))


def test_interleaved_rounds_alternate_the_order_and_time_each_run(records) -> None:
    calls: list[str] = []
    seconds = records.interleaved_rounds({"ours": lambda: calls.append("ours"), "peft": lambda: calls.append("peft")}, 3)
    assert calls == ["ours", "peft", "peft", "ours", "ours", "peft"]  # whoever goes first in a round alternates
    assert {name: len(values) for name, values in seconds.items()} == {"ours": 3, "peft": 3}
    assert all(value >= 0 for values in seconds.values() for value in values)
