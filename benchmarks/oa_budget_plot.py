"""Plot and tabulate oa_adapter's learned budget (r_eff per site and task) from a finished run's results.json.

    python benchmarks/oa_budget_plot.py --run runs/bench_oa_text/oa_adapter --compare runs/bench_oa_text/o_lora \
        --section oa_adapter_budget --plot docs/methods/oa_adapter_budget.png

Writes the heat map (sites x tasks, cell = r_eff) to --plot and a table of r_eff per site and task plus the
stored adapter parameters per task and cumulative to a section of docs/results/legacy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402
from stream_benchmark import markdown_table  # noqa: E402


def load_run(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def short_site(site: str) -> str:
    """encoder.layer.3.attention.self.query -> L3.query"""
    parts = site.split(".")
    numbers = [part for part in parts if part.isdigit()]
    return f"L{numbers[0]}.{parts[-1]}" if numbers else parts[-1]


def plot_budget(run: dict, path: Path) -> None:
    """Heat map of r_eff: one row per site, one column per task."""
    metrics = run["method_metrics"]
    tasks = list(metrics["r_eff"])
    budget = np.array([metrics["r_eff"][task] for task in tasks], dtype=float).T  # [sites, tasks]
    figure, axis = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 0.32 * len(metrics["sites"]) + 1.6))
    image = axis.imshow(budget, vmin=0, vmax=metrics["r_max"], cmap="magma", aspect="auto")
    axis.set_xticks(range(len(tasks)), tasks, fontsize=8)
    axis.set_yticks(range(len(metrics["sites"])), [short_site(site) for site in metrics["sites"]], fontsize=7)
    for (i, j), value in np.ndenumerate(budget):
        axis.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7, color="white" if value < metrics["r_max"] * 0.6 else "black")
    axis.set_xlabel("task")
    axis.set_title(f"{run['label']}: r_eff per site and task (r_max {metrics['r_max']})", fontsize=9)
    figure.colorbar(image, ax=axis, shrink=0.8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(run: dict, compare: list[dict], plot: Path) -> str:
    metrics = run["method_metrics"]
    tasks = list(metrics["r_eff"])
    rows = [[short_site(site)] + [str(metrics["r_eff"][task][i]) for task in tasks] for i, site in enumerate(metrics["sites"])]
    totals = [sum(metrics["r_eff"][task]) for task in tasks]
    rows.append(["total"] + [str(total) for total in totals])
    maximum = metrics["r_max"] * len(metrics["sites"])
    parts = [
        f"Budget plot: `{plot}`. r_eff per site and task (`{run['label']}`, r_max {metrics['r_max']}; "
        f"total per task out of {maximum}):",
        "",
        markdown_table(["site"] + tasks, rows),
        "",
    ]
    active = metrics["active_adapter_params_per_task"]
    maximal = metrics["max_adapter_params_per_task"]
    cost_rows = [
        [task, str(a), str(maximal), f"{a / maximal:.3f}", str(c)]
        for task, a, c in zip(tasks, active, metrics["stored_adapter_params_cumulative"])
    ]
    parts += [
        "Adapter parameters (factors + gate entries + tau; head rows excluded): stored after pruning, the r_max "
        "maximum trained per task, their ratio, and the cumulative stored total:",
        "",
        markdown_table(["task", "stored", "maximum", "stored / maximum", "cumulative stored"], cost_rows),
        "",
        f"Dimensions that came back to life during training (inactive -> active), per task: `{metrics['revivals']}`",
        "",
    ]
    if compare:
        bytes_rows = [
            [other["label"], " / ".join(str(b) for b in other["stored_bytes_per_task"]), str(other["stored_bytes_cumulative"][-1])]
            for other in [run, *compare]
        ]
        parts += [
            "Stored bytes per task and in total (every tensor beyond the frozen backbone, head rows included):",
            "",
            markdown_table(["method", "stored bytes per task", "total"], bytes_rows),
            "",
        ]
        ours = run["stored_bytes_cumulative"][-1]
        for other in compare:
            saving = 1 - ours / other["stored_bytes_cumulative"][-1]
            parts.append(f"`{run['label']}` stores {saving:.1%} fewer bytes than `{other['label']}` after the last task.")
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an oa_adapter run folder (holds results.json)")
    parser.add_argument("--compare", action="append", default=[], help="other run folders for stored-size rows")
    parser.add_argument("--section", required=True)
    parser.add_argument("--title", default="oa_adapter: learned budget per site and task")
    parser.add_argument("--plot", default="docs/methods/oa_adapter_budget.png")
    args = parser.parse_args()
    run = load_run(Path(args.run))
    compare = [load_run(Path(folder)) for folder in args.compare if (Path(folder) / "results.json").is_file()]
    plot = Path(args.plot)
    plot_budget(run, plot)
    body = render(run, compare, plot)
    path = write_section(args.section, args.title, body)
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
