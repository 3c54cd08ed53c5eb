"""Run outputs: results.json, report.md and plots, rendered from the results dicts alone."""

from loracl.report.render import format_summary_table, render_report_markdown
from loracl.report.write import load_summary, rerender, write_run_outputs, write_summary_outputs

__all__ = [
    "format_summary_table",
    "load_summary",
    "render_report_markdown",
    "rerender",
    "write_run_outputs",
    "write_summary_outputs",
]
