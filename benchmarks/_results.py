"""Write one named section of docs/results/legacy.md, leaving every other section as it is.

Each benchmark owns a section delimited by HTML comments, so scripts (and people) never overwrite each
other's figures. The section records the exact command that produced it.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "legacy.md"
HEADER = (
    '# Measured results\n\n'
    'Every figure on this page was written by a script in `benchmarks/`; the command that produced each\n'
    'section is printed in it. Re-run the command to reproduce it. Nothing here is typed by hand.\n'
    '\n'
    'Two changes on 2026-11-22 split this page; each section\'s "written" line tells which side it is on.\n'
    '(1) 22:02 UTC: `LoraOptions` defaults (seq_lora, inc_lora, joint) moved from alpha 16 / dropout 0 to the O-LoRA\n'
    "code's alpha 32 / dropout 0.1 shared by a layer's branches (baselines.md Part 2). (2) 22:19 UTC: a harness bug\n"
    "was fixed that kept every adapter's dropout off while training (the frozen backbone was put in eval mode with\n"
    "the adapters inside it); before it, o_lora's and oa_adapter's configured dropout 0.1 never acted either.\n"
    'Sections written before 22:02 used alpha 16 / no dropout; sections written between 22:02 and 22:19 used\n'
    'alpha 32 / no dropout; sections written later use alpha 32 / dropout 0.1. Methods without adapter dropout\n'
    '(probe, inflora, sd_lora, lorac_ipc, metalora, fm_lora) are unaffected by both.\n'
    '\n'
    'Changes on 2026-11-23 that later sections include: `head.align` (classifier alignment, off by default),\n'
    "`train.eval_next_task` (FWT), InfLoRA's per-epoch cosine schedule (default; a one-epoch run is unchanged, the\n"
    'digits runs with 5 epochs are not), and `freeze_old` no longer freezing the rows of classes a new task shares with\n'
    'an earlier one (only shared-label / domain-incremental streams are affected; no earlier section used one).\n'
    "At 04:35 UTC metalora's `router` default moved from cosine to mahalanobis: metalora commands written before then\n"
    'without a `router:` key ran the cosine router (the collected sections name the router of every row).\n'
    "At 09:24 UTC the task router's class means moved from float64 to float32 storage (routed rows and metalora:\n"
    'stored bytes 1,536 B lower per class; routing scores change in the 7th digit).\n'
    "From 11:30 UTC: fm_lora's further spec options (`core_form`, `drs_granularity`, `prompt_depth`) as rows of\n"
    '`fm_lora_ablations_text_full`, fm_lora served by the cores as of each routed task in\n'
    "`fm_lora_routed_cores_text_full` (task-incremental, each task's own increment: `fm_lora_til_cores_text_full`),\n"
    "and the F-VAE's cost per step for ICM-Fusion's two targets in `fvae_cost`.\n"
    '\n'
    'Where to look first: the full text stream in `text_stream_baselines_full` (baselines, linear and prototype\n'
    'heads), `text_stream_aligned_full` (every method with and without `head.align`), one `*_text_full` section per\n'
    'method issue (metalora: `metalora_router_text_full`; lorac_ipc: `lorac_ipc_text_stream_full`), every method with\n'
    'and without routed inference beside the routed probe in `text_stream_routed_full` (serving cost:\n'
    '`serving_time_routed`; digits: `digits_routed`, `digits_routed_probe`),\n'
    '`text_stream_cosine_head_full`, and `step_time_text` (train step time of every method on an idle\n'
    'machine); digits in `digits_aligned`; forward transfer in `shared_labels_fwt`; the default run in\n'
    '`quickstart_time`; speed against PEFT in `peft_speed`. GPU sections (one lent H100): `icm_fusion_gpu*` and\n'
    '`icm_fusion_stream_text_gpu`. Sections with "300 train / 200 test" in their title are\n'
    'the earlier reduced stream.\n'
)


def current_command() -> str:
    """The command line that is running, as someone would type it from the repository root."""
    return "python " + " ".join(shlex.quote(part) for part in sys.argv)


def machine_line() -> str:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name: str, title: str, body: str, command: str | None = None) -> Path:
    """Replace (or append) the section `name` of docs/results/legacy.md with `body`, under a lock."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"{begin}\n## {title}\n\n"
        f"Command: `{command or current_command()}`  \n"
        f"Machine: {machine_line()}; written {stamp}.\n\n{body.rstrip()}\n{end}"
    )
    lock_path = RESULTS.with_suffix(".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else HEADER
        first_section = text.find("<!-- BEGIN ")
        if first_section >= 0:  # the page header always comes from HEADER, so the two never drift apart
            text = HEADER + "\n" + text[first_section:]
        if begin in text and end in text:
            before, rest = text.split(begin, 1)
            _, after = rest.split(end, 1)
            text = before + section + after
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        temporary = RESULTS.with_suffix(".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(RESULTS)
    return RESULTS
