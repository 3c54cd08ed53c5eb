"""`loracl run | report | fuse | export | list`: exit 0 on success, 2 on bad input (one line, no traceback), 1 otherwise."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from loracl.errors import LoraclError

EXIT_BAD_INPUT = 2


def _check_writable(out: Path) -> None:
    """Create OUT if needed and prove a file can be written there, before any training starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise LoraclError(f"output directory {out} is not writable ({exc.strerror})") from None


def _lock(out: Path) -> Any:
    """Hold OUT for this run: a second `loracl run` on the same folder is refused instead of interleaving its
    log and results with this one. The lock is the kernel's (flock), so a killed run never leaves it behind."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not locked there
        return None
    handle = open(out / ".loracl.lock", "w")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LoraclError(f"another loracl run is writing to {out}; wait for it or choose another --out") from None
    return handle


def _log_to(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("loracl")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def _close_log(handler: logging.Handler) -> None:
    logging.getLogger("loracl").removeHandler(handler)
    handler.close()


def _remove_fresh_log(out: Path, entries_before: set[str] | None) -> None:
    """A bad input found before anything was written leaves no trace: this call's new run.log and lock file go
    (and OUT, if this call created it); if anything else was written, or the log was there before (a resume),
    all is kept."""
    before = entries_before or set()
    ours = {"run.log", ".loracl.lock"}
    try:
        if "run.log" in before or {entry.name for entry in out.iterdir()} - ours != before - ours:
            return
        for name in ours - before:
            (out / name).unlink(missing_ok=True)
        if entries_before is None:
            out.rmdir()
    except OSError:
        pass  # the cleanup must never hide the user's error


def command_run(args: argparse.Namespace) -> int:
    from loracl.config import load_config
    from loracl.engine import run_experiment
    from loracl.report import format_summary_table

    config = load_config(args.config, args.set)
    out = Path(args.out)
    entries_before = {entry.name for entry in out.iterdir()} if out.is_dir() else None
    _check_writable(out)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch` the other ranks write nothing
    lock = _lock(out) if main_process else None
    handler = _log_to(out) if main_process else logging.NullHandler()
    try:
        results = run_experiment(config, out)
    except LoraclError:
        _close_log(handler)
        if lock is not None:
            lock.close()
        _remove_fresh_log(out, entries_before)
        raise
    finally:
        _close_log(handler)  # closing twice is harmless
        if lock is not None:
            lock.close()
    if not main_process:  # the main process prints the one summary
        return 0
    print(format_summary_table([result.results for result in results]))
    print(f"\nresults: {out / 'results.json'}   report: {out / 'report.md'}   plot: {out / 'accuracy_matrix.png'}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from loracl.report import format_summary_table, load_summary, rerender
    from loracl.report.compare import compare_folders, format_comparison, write_comparison

    if len(args.out) == 1:  # one run folder: re-render its report.md and plot
        if args.out_file is not None or args.baseline is not None:
            raise LoraclError("--out-file and --baseline compare several run folders; give two or more")
        [out] = args.out
        report = rerender(out)
        print(format_summary_table(load_summary(out)["runs"]))
        print(f"\nreport: {report}")
        return 0
    comparison = compare_folders(args.out, args.baseline)  # several: one comparison, nothing written into them
    written = write_comparison(comparison, args.out_file) if args.out_file is not None else None
    print(format_comparison(comparison))
    if written is not None:
        print(f"\ncomparison: {written}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from loracl.engine.export import export_run_task

    folder = export_run_task(Path(args.run), args.task, Path(args.out))
    print(f"PEFT adapter written to {folder}")
    return 0


def command_fuse(args: argparse.Namespace) -> int:
    from loracl.fusion.cli import fuse_from_args

    folder = fuse_from_args(args)
    print(f"fused PEFT adapter written to {folder} (report: {folder / 'fusion_report.json'})")
    return 0


def command_list(args: argparse.Namespace) -> int:
    from loracl.backbones.language import LANGUAGE_MODELS
    from loracl.backbones.registry import BACKBONES
    from loracl.data.build import SOURCES
    from loracl.methods.registry import available_methods, method_class

    print("methods:")
    for name in available_methods():
        print(f"  {name:12s} {method_class(name).description}")
    print("backbones (or any Hugging Face id / local directory):")
    for name, (_, description) in BACKBONES.items():
        print(f"  {name:12s} {description}")
    print("language models (task_model: language; or any causal / seq2seq Hugging Face id, folder or .gguf file):")
    for name, (_, description) in LANGUAGE_MODELS.items():
        print(f"  {name:12s} {description}")
    print("data sources:")
    for name, description in SOURCES.items():
        print(f"  {name:12s} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracl", description="Continual learning with LoRA-family methods.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and evaluate the methods of a config on its stream")
    run.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded quickstart)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--out", default="runs/latest", help="output directory (resumes if it holds checkpoints)")
    run.set_defaults(handler=command_run)
    report = commands.add_parser(
        "report", help="re-render report.md and plots of a finished run; with several runs, compare them"
    )
    report.add_argument("out", nargs="+", help="the --out folder of a finished `loracl run` (several: one comparison)")
    report.add_argument("--baseline", help="with several folders: the label every row is judged against (default: seq_lora)")
    report.add_argument("--out-file", help="with several folders: also write the comparison as Markdown to this file")
    report.set_defaults(handler=command_report)
    export = commands.add_parser("export", help="write one task's LoRA of a run as a PEFT adapter folder")
    export.add_argument("run", help="a method's run folder, OUT/<method label>")
    export.add_argument("--task", type=int, default=-1, help="task index (default: the last finished)")
    export.add_argument("--out", required=True)
    export.set_defaults(handler=command_export)
    fuse = commands.add_parser("fuse", help="fuse several task LoRAs into one PEFT adapter (icm_fusion, merges)")
    fuse.add_argument("adapters", nargs="*", help="PEFT LoRA folders, one per task")
    fuse.add_argument("--run", help="a method's run folder (OUT/<label>) whose per-task branches are fused")
    fuse.add_argument("--tasks", help="with --run: comma-separated task indices (default: all)")
    fuse.add_argument("--method", default="icm", help="icm, linear, cat, svd, ties, dare_ties, lorahub, ...")
    fuse.add_argument("--examples", action="append", default=[], help="per adapter, in order: JSON/JSONL texts")
    fuse.add_argument("--num-examples", type=int, default=16, help="examples used per task")
    fuse.add_argument("--base", help="base model (registry name, HF id, directory); default: the adapters' own")
    fuse.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a fusion option, e.g. icm.inner_steps=1")
    fuse.add_argument("--out", required=True)
    fuse.set_defaults(handler=command_fuse)
    listing = commands.add_parser("list", help="methods, backbones and data sources")
    listing.set_defaults(handler=command_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loracl` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub unless the user sets it to 0
    try:
        return args.handler(args)
    except LoraclError as exc:
        print(f"loracl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("loracl: interrupted; run the same command again to resume after the last finished task", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
