"""The cost sections of docs/results.md ("Several processes (CPU)" and "Costs"), rendered from the cost records
that benchmarks/{multiprocess_speed,quickstart_time,peft_speed,gpu_speed,fvae_cost}.py write; nothing typed by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import RESULTS, load_record, provenance  # noqa: E402


def multiprocess_lines(record: dict[str, Any]) -> list[str]:
    """multiprocess_speed.json: samples/s of seq_lora in one process and in two, as one paragraph."""
    return [f"seq_lora on {', '.join(record['tasks'])} ({record['train_per_task']} train per task, global batch {record['global_batch']}):"
            f" {record['processes_1']['train_samples_per_s']:.1f} samples/s in one process, {record['processes_2']['train_samples_per_s']:.1f}"
            f" with two (ratio {record['ratio_2_over_1']:.2f}; {record['machine']}, {record['date']}). Two processes on two cores share"
            " the cores one process already uses: this is the distributed path's overhead there, not a speed-up."
            " (`python benchmarks/multiprocess_speed.py`)", ""]


def quickstart_lines(record: dict[str, Any]) -> list[str]:
    """quickstart_time.json: the embedded default run's wall time against its target, as one sentence."""
    met = "met" if record["wall_s"] < record["target_s"] else "NOT met"
    accuracies = ", ".join(f"{run['label']} {run['avg_accuracy']:.3f}" for run in record["runs"])
    return [f"**The embedded default run** (`loracl run` with no config, {len(record['runs'])} method entries): {record['wall_s']:.0f} s"
            f" wall time end to end, target under {record['target_s']} s: {met}. Average accuracy: {accuracies}"
            f" ({provenance(record, 'quickstart_time')}).", ""]


def peft_speed_lines(record: dict[str, Any]) -> list[str]:
    """peft_speed.json: seq_lora's training against PEFT's LoRA and merged inference against the bare model, as a table."""
    setup, train, evaluation = record["setup"], record["train_samples_per_s"], record["eval_ms_per_batch"]
    train_met = "yes" if record["train_ratio"] >= record["train_target"] else "no"
    eval_met = "yes" if record["eval_ratio"] <= record["eval_target"] else "no"
    return [
        f"**Speed against PEFT** (MiniLM-L6, rank {setup['rank']} / alpha {setup['alpha']:g} on query and value, batch {setup['batch']},"
        f" length {setup['length']}, median of {setup['rounds']} interleaved rounds of {setup['steps']} steps; {provenance(record, 'peft_speed')}):", "",
        "| measure | loracl | reference | ratio | target | met |", "|---|---|---|---|---|---|",
        f"| train samples/s, seq_lora vs PEFT LoRA | {train['loracl']:.1f} | {train['peft']:.1f} (PEFT) | {record['train_ratio']:.3f}"
        f" | >= {record['train_target']:g} | {train_met} |",
        f"| eval time per batch, merged adapter vs bare model | {evaluation['merged']:.1f} ms | {evaluation['bare']:.1f} ms (bare)"
        f" | {record['eval_ratio']:.3f} | <= {record['eval_target']:g} | {eval_met} |", "",
        f"Fastest round instead of the median: train ratio {record['fastest_round']['train_ratio']:.3f}, eval ratio"
        f" {record['fastest_round']['eval_ratio']:.3f}. On a shared machine read ratios within about 0.03 of 1.0 as equal speed.", "",
    ]


def fvae_cost_lines(record: dict[str, Any]) -> list[str]:
    """fvae_cost.json: the F-VAE's size and training-step time for ICM-Fusion's two targets, as a table."""
    setup = record["setup"]
    rows = [f"| {row['target']} | {row['conv_divisor']} | {row['values_per_lora']:,} | {row['parameters']:,} | {row['s_per_step']:.2f}"
            f" | {row['warm_start_min']:.1f} |" for row in record["rows"]]
    return [
        f"**F-VAE cost per training step** (ICM-Fusion; batch {setup['batch']}, mean of {setup['timed_steps']} steps, {setup['threads']} threads,"
        f" at MiniLM-L6's query/value LoRA shapes, r={setup['rank']}; `delta` is {record['delta_over_factors_length']:.0f}x longer than `factors`;"
        f" {provenance(record, 'fvae_cost')}):", "",
        f"| target | conv widths / | values per LoRA | F-VAE parameters | s per step | min for {setup['warm_start_steps']} warm-start steps |",
        "|---|---|---|---|---|---|", *rows, "",
    ]


def gpu_speed_lines(record: dict[str, Any]) -> list[str]:
    """gpu_speed.json: loracl's LoRA against PEFT's on a GPU per model (train, merged eval, memory, MFU), as a table."""
    setup, reference = record["setup"], record.get("reference", {})
    if setup.get("tiny"):  # a check of the script on tiny CPU models, not a measurement
        return []
    train_target, eval_target = record["train_target"], record["eval_target"]
    lines = [
        f"**GPU speed against PEFT** ({setup['device']}, {setup['dtype']}, PEFT {setup['peft']}, batch {setup['batch']}, rank {setup['rank']} /"
        f" alpha {setup['alpha']:g} on query and value, median of {setup['rounds']} interleaved rounds of {setup['steps']} steps; FLOPs as"
        f" torch's FlopCounterMode counts them, MFU against {setup['peak_tflops']:g} TFLOP/s; {provenance(record, 'gpu_speed')}):", "",
        f"| model | train samples/s loracl / PEFT | ratio (target >= {train_target:g}) | train tokens/s loracl | merged / bare eval time"
        f" (target <= {eval_target:g}) | train working GiB loracl / PEFT | MFU train loracl / eval merged / eval bare |"
        f" reference ({reference.get('device', '-')}, PEFT {reference.get('peft', '-')}): train / merged / bare samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in record["rows"].items():
        train, memory, mfu = row["train_samples_per_s"], row["train_working_memory_gib"], row["mfu"]
        known = reference.get(name)
        reference_cell = f"{known['train']:,} / {known['merged_eval']:,} / {known['bare_eval']:,}" if known else "-"
        lines.append(
            f"| {name} | {train['loracl']:,.0f} / {train['peft']:,.0f} | {row['train_ratio']:.3f}"
            f" ({'met' if row['train_ratio'] >= train_target else 'not met'}) | {row['train_tokens_per_s']['loracl']:,.0f}"
            f" | {row['eval_ratio']:.3f} ({'met' if row['eval_ratio'] <= eval_target else 'not met'})"
            f" | {memory['loracl']:.2f} / {memory['peft']:.2f} | {mfu['train_loracl']:.1%} / {mfu['eval_merged']:.1%} / {mfu['eval_bare']:.1%}"
            f" | {reference_cell} |")
    return [*lines, ""]


COSTS = {"quickstart_time": quickstart_lines, "peft_speed": peft_speed_lines, "gpu_speed": gpu_speed_lines, "fvae_cost": fvae_cost_lines}


def several_processes_section(results: Path = RESULTS) -> list[str]:
    """The 'Several processes (CPU)' section of docs/results.md, or nothing without multiprocess_speed.json."""
    record = load_record("multiprocess_speed", results)
    return [] if record is None else ["## Several processes (CPU)", "", *multiprocess_lines(record)]


def costs_section(results: Path = RESULTS) -> list[str]:
    """The 'Costs' section of docs/results.md from the cost records that exist; nothing when none does."""
    body = []
    for name, lines in COSTS.items():
        record = load_record(name, results)
        if record is not None:
            body += lines(record)
    return ["## Costs", "", *body] if body else []
