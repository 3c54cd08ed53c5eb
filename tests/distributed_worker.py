"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2 --cpu` (not collected by pytest).

Trains inc_lora (or the methods named) on a tiny stream and writes, per process, the trainable parameters' digest
before every training step, the accuracy matrices and method metrics, how many test examples the process predicted,
and, after the run, every task's accuracy and the method metrics of one more evaluation sharded between the
processes and one unsharded (every process alone, as one process would); with methods named, the same for zero_shot
on a tiny language model: `python tests/distributed_worker.py OUT [kill_after_task] [method,method,...]`
(kill_after_task -1: no kill). With methods named, the default inc_lora run goes first, into OUT/default, so one
launch serves both sets of tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config, tiny_text_stream  # noqa: E402

import loracl.engine.runner as runner_module  # noqa: E402
from loracl.engine import run_experiment  # noqa: E402
from loracl.engine.loaders import SplitLoader  # noqa: E402

# evaluation batches of 3 out of 8 test examples per task: 3 + 3 + 2, dealt out unevenly (5 and 3 examples)
CONFIG = {"train": {"batch_size": 8, "lr": 5e-3, "epochs": 2, "eval_batch_size": 3}}
# 4 test examples per task in batches of 1: 2 per process
METHODS_CONFIG = {"train": {"batch_size": 4, "epochs": 1, "eval_batch_size": 1}}


# what a method needs to train under several processes (LoRAC-IPC's default importance reads rank-local gradients)
# (and sizes shrink: ICM-Fusion's default VAE training takes minutes)
DISTRIBUTED_OPTIONS = {
    "lorac_ipc": {"ipc_importance": "lora_factors"},
    "icm_fusion": {"harvest_checkpoints": 2, "fusion": {"warm_start_steps": 4, "meta_steps": 2, "learned_weight_steps": 2, "latent_dim": 8}},
}


def config(methods: list[str] | None = None):
    # the default run routes (routed_inference), so its routing accuracy is compared with one process's too
    entries = [{"name": name, **DISTRIBUTED_OPTIONS.get(name, {})} for name in methods or []] or [
        {"name": "inc_lora", "dropout": 0.0, "routed_inference": True}
    ]
    return tiny_config(entries, **(CONFIG if not methods else METHODS_CONFIG))


def stream(methods: list[str] | None = None):
    return tiny_text_stream(2, train=8, test=4) if methods else tiny_text_stream(3, train=20, test=8)


def forget_evaluation_counts(method) -> None:  # noqa: ANN001
    """Forget the counts of the last evaluation round (routing tallies, LoRAC-IPC's w/o-TII shadow counts), so
    the next evaluation's are the method's metrics of the current round."""
    method.routing_tally.counts = {}
    if hasattr(method, "newest_counts"):
        method.newest_counts = {}


def reevaluate(run, method) -> dict:  # noqa: ANN001
    """The trained model evaluated once more on every task, sharded and unsharded."""
    tasks = run.stream.tasks
    out = {}
    for name, sharded in (("sharded", True), ("unsharded", False)):
        run.shard_evaluation = sharded
        forget_evaluation_counts(method)
        accuracies, samples, _ = run.evaluate(method, tasks)
        counts = {"routing": method.routing_tally.counts, "without_tii": getattr(method, "newest_counts", {})}
        out[name] = {
            "accuracies": accuracies,
            "other_metrics": run.other_metrics,
            "samples": samples,
            "metrics": method.task_metrics(),
            "counts": json.loads(json.dumps(counts)),
        }
    return out


def language_run(out: Path) -> list:
    """zero_shot on a tiny Llama (generation per batch), 2 test examples per task in batches of 1, with one more
    per-example metric beside accuracy and ROUGE-L whose values are not all zero (the random model's answers
    score 0): its gathered sums show that metrics beyond accuracy are summed over both processes."""
    from test_language_model import instruction_stream, lm_config

    from loracl.task_models.language import LanguageTaskModel

    original = LanguageTaskModel.example_scores

    def with_position(self, predictions, batch, task, scenario):  # noqa: ANN001, ANN202
        scores = original(self, predictions, batch, task, scenario)
        return {**scores, "position": torch.tensor([1 / (3 + key[2]) for key in batch["example_keys"]], dtype=torch.float64)}

    LanguageTaskModel.example_scores = with_position
    config = lm_config("zero_shot", train={"eval_batch_size": 1})
    return run_experiment(config, out / "language", stream=instruction_stream())


def main() -> None:
    out = Path(sys.argv[1])
    kill_after = int(sys.argv[2]) if len(sys.argv) > 2 and int(sys.argv[2]) >= 0 else None
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    rank = int(os.environ.get("RANK", "0"))
    digests: list[str] = []
    original_forward = runner_module.TrainingStep.forward

    def recording_forward(self, batch):  # noqa: ANN001, ANN202 - TrainingStep.forward's signature
        trainable = [p.detach().double().cpu() for p in self.model.parameters() if p.requires_grad]
        digests.append(self.method[0].name + ":" + hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainable)).hexdigest())
        return original_forward(self, batch)

    runner_module.TrainingStep.forward = recording_forward
    test_examples = [0]  # test examples this process predicted (sharded evaluation: about half of them)
    original_numbered = SplitLoader.numbered

    def counting_numbered(self):  # noqa: ANN001, ANN202
        for position, batch in original_numbered(self):
            if self.split_name == "test":
                test_examples[0] += len(batch["labels"])
            yield position, batch

    SplitLoader.numbered = counting_numbered
    runs = []
    original_run = runner_module.MethodRun.run

    def recording_run(self):  # noqa: ANN001, ANN202
        runs.append(self)
        return original_run(self)

    runner_module.MethodRun.run = recording_run
    if kill_after is not None:
        original_checkpoint = runner_module.MethodRun.checkpoint

        def checkpoint_then_die(self, method, task_index, with_backbone):  # noqa: ANN001, ANN202
            original_checkpoint(self, method, task_index, with_backbone)
            if task_index == kill_after:
                self.accelerator.wait_for_everyone()
                os._exit(17)  # as a kill would: no cleanup, nothing flushed beyond the checkpoint

        runner_module.MethodRun.checkpoint = checkpoint_then_die
    def summarise(results: list) -> dict:  # RunResults
        summary = {
            "matrix": results[0].accuracy_matrix,
            "matrices": {result.label: result.accuracy_matrix for result in results},
            "metric_rows": {result.label: result.results["per_task"][-1].get("metric_rows", {}) for result in results},
            "method_metrics": {result.label: result.results["method_metrics"] for result in results},
            "eval_samples": sum(record["eval_samples"] for result in results for record in result.results["per_task"]),
            "test_examples": test_examples[0],
        }
        if kill_after is None:  # after the run: its model evaluated again, sharded and not
            summary["reevaluated"] = {result.label: reevaluate(run, result.method) for run, result in zip(runs, results)}
        return summary

    def run_one(names: list[str] | None, folder: Path) -> None:
        """One run of the configuration for `names` (None: the default inc_lora run) into folder/rank<r>.json."""
        digests.clear()
        test_examples[0], runs[:] = 0, []
        summary = {"world": int(os.environ.get("WORLD_SIZE", "1"))}
        summary.update(summarise(run_experiment(config(names), folder / "run", stream=stream(names))))
        summary["digests"] = list(digests)
        if names:  # a language model's evaluation too
            test_examples[0], runs[:] = 0, []
            summary["language"] = summarise(language_run(folder))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(summary))

    if methods:  # one launch for both: the default run first (into OUT/default), as a launch of its own would run it
        run_one(None, out / "default")
    run_one(methods, out)
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
