"""The training loop (accelerate), evaluation after each task, checkpoints and resume."""

from loracl.engine.runner import RunResult, run_experiment, run_method

__all__ = ["RunResult", "run_experiment", "run_method"]
