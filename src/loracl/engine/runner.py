"""Run a config: for each method entry, train task after task, evaluate all seen tasks, checkpoint, resume."""

from __future__ import annotations

import copy
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from tqdm.auto import tqdm

from loracl import metrics
from loracl.adapters.fused import fused_layouts, join_part_states, split_part_states
from loracl.backbones.compiled import compile_blocks
from loracl.backbones.heads import LinearHead, head_rows_generator
from loracl.backbones.registry import load_backbone
from loracl.config import MethodConfig, RunConfig, TaskModelConfig, config_to_dict
from loracl.data.build import load_stream
from loracl.data.stream import Split, Stream, Task
from loracl.engine.checkpoint import (
    CorruptCheckpoint,
    config_fingerprint,
    finished_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from loracl.engine.loaders import SplitLoader
from loracl.errors import CheckpointError, ConfigError, LoraclError, TrainingDiverged
from loracl.methods.base import Method, MethodContext, MethodOptions
from loracl.methods.registry import create_method
from loracl.seeding import derived_generator, derived_seed
from loracl.task_models import build_task_model

logger = logging.getLogger("loracl")
SCHEMA_VERSION = 1


@dataclass
class RunResult:
    """One method's results (the results.json contract) and where its files are."""

    label: str
    results: dict[str, Any]
    run_dir: Path | None = None
    method: Method | None = field(default=None, repr=False)

    @property
    def accuracy_matrix(self) -> list[list[float | None]]:
        return self.results["accuracy_matrix"]


def _versions() -> dict[str, str]:
    import platform

    import accelerate
    import transformers

    from loracl import __version__

    return {
        "loracl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def check_stream_fits_backbone(stream: Stream, backbone: Any) -> None:
    """Every input must be something this backbone can take (strings for text, right-sized images)."""
    if stream.modality != backbone.modality:
        raise LoraclError(
            f"the stream holds {stream.modality} inputs but the backbone `{backbone.name}` is a {backbone.modality} model"
        )
    for task in stream.tasks:
        for split_name, split in (("train", task.train), ("test", task.test)):
            for position, example in enumerate(split.inputs):
                backbone.check_input(example, f"task `{task.name}` {split_name} example {position}")
                if stream.modality == "text":
                    break  # strings were validated when read; one check per split is enough


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _task_wall_s(record: dict[str, Any]) -> float:
    """A finished task's wall time; records written before it was stored give their training plus evaluation."""
    if "wall_s" in record:
        return float(record["wall_s"])
    return float(record.get("train_s", 0.0)) + float(record.get("eval_s", 0.0))


def stream_structure(stream: Stream) -> dict[str, Any]:
    """A stream without its examples: enough to rebuild every task's structure (head rows, branches)."""
    return {
        "class_names": stream.class_names,
        "scenario": stream.scenario,
        "modality": stream.modality,
        "tasks": [
            {"name": task.name, "index": task.index, "class_ids": task.class_ids, "free_form": task.free_form, "options": task.options}
            for task in stream.tasks
        ],
    }


def stream_from_structure(data: dict[str, Any]) -> Stream:
    """The inverse of stream_structure: tasks with empty splits."""
    tasks = [
        Task(
            item["name"], int(item["index"]), list(item["class_ids"]), Split([], []), Split([], []), bool(item.get("free_form")), list(item.get("options", []))
        )
        for item in data["tasks"]
    ]
    return Stream(tasks, list(data["class_names"]), data["scenario"], data["modality"])


def _joint_task(stream: Stream) -> Task:
    """All tasks' training data as one task over every class."""
    inputs, labels, targets, headers = [], [], [], []
    for task in stream.tasks:
        inputs += task.train.inputs
        labels += task.train.labels
        targets += task.train.targets
        headers += task.train.headers
    class_ids = sorted({class_id for task in stream.tasks for class_id in task.class_ids})
    return Task("joint", 0, class_ids, Split(inputs, labels, targets, headers), Split([], []))


def make_accelerator(cpu: bool, mixed_precision: str) -> Accelerator:
    """The run's Accelerator. accelerate keeps one state per process and refuses a second Accelerator with other
    settings; in a single process (a notebook, or configs with different train.mixed_precision run one after the
    other) that state is reset, while under several processes the launcher's settings must be matched."""
    from accelerate.state import AcceleratorState

    # find_unused_parameters: a task trains only its own branches and head rows, and the set changes per task
    kwargs = {"cpu": cpu, "mixed_precision": mixed_precision, "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}
    try:
        return Accelerator(**kwargs)
    except ValueError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own reset (what its test utilities call)
        return Accelerator(**kwargs)


def sharding_request_ignored(kind: str, environ: Mapping[str, str]) -> str | None:
    """The line to warn with when the launcher asked for FSDP or DeepSpeed but accelerate runs plain data parallelism:
    accelerate (1.x) drops both on the CPU (`accelerate launch --use_fsdp` there gives DDP), so nothing is sharded."""
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if environ.get(variable, "").lower() in ("1", "true", "yes")]
    if not requested or kind in ("FSDP", "DEEPSPEED"):
        return None
    return (f"{requested[0]} was requested at launch but accelerate runs {kind} (it shards nothing on the CPU):"
            " every process holds the whole model")


class TrainingStep(torch.nn.Module):
    """One training step's forward as a module: the method's outputs, its task loss and extra losses. Wrapped by
    accelerate (DDP) under several processes; holds the task model so every parameter is the module's."""

    def __init__(self, method: Method, model: torch.nn.Module) -> None:
        super().__init__()
        self.method = [method]  # a list, so the method is not registered as a submodule
        self.model = model

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.method[0]
        outputs = method.forward(batch)
        loss = method.task_loss(outputs, batch)
        extra = method.extra_loss(batch, outputs)
        return loss, loss if extra is None else loss + extra


class MethodRun:
    """Everything one method entry needs during its run; small helpers for each phase."""

    def __init__(self, config: RunConfig, entry: MethodConfig, stream: Stream, run_dir: Path | None) -> None:
        self.config = config
        self.entry = entry
        self.stream = stream
        self.run_dir = run_dir
        self.train = config.train
        self.head = config.head_for(entry)
        self.accelerator = make_accelerator(config.train.cpu or not torch.cuda.is_available(), config.train.mixed_precision)
        self.device = self.accelerator.device
        self.progress = config.train.progress and self.accelerator.is_local_main_process
        run_config = config_to_dict(config)
        # the resolved knobs, defaults included: a run must not resume under changed defaults
        resolved = {"name": entry.name, "head": self.head.model_dump(mode="json"), **entry.options.fingerprint_dump()}
        run_config["method"] = [resolved]
        run_config["backbone"] = config.backbone.fingerprint_dump()
        run_config["train"] = config.train.fingerprint_dump()
        if config.task_model == TaskModelConfig():  # classifier runs made before the section existed still resume
            run_config.pop("task_model", None)
        self.fingerprint = config_fingerprint(run_config)
        self.records: list[dict[str, Any]] = []
        # under several processes each one evaluates a shard of every test split (whole batches) and the counts are
        # gathered; False: every process evaluates every example (what one process would do, alone)
        self.shard_evaluation = self.accelerator.num_processes > 1

    # ----- building ----------------------------------------------------------------------------------
    def build(self) -> Method:
        backbone = configured_backbone(self.config)
        check_stream_fits_backbone(self.stream, backbone)
        check_task_model_settings(self.config, self.entry, backbone)
        self.model = build_task_model(backbone, self.config, self.head).to(self.device)
        if self.train.compile:
            compile_blocks(self.model.backbone, self.train.compile_backend, self.device)
        return build_method(self.config, self.entry, self.stream)

    def loader(self, split: Split, task: Task, train: bool, split_name: str | None = None, evaluation: bool = False) -> SplitLoader:
        """Training batches are split between the processes; evaluation batches (evaluation=True) are dealt out
        whole (evaluation_shard); any other loader (statistics of prepare_task, end_task) gives each process all."""
        model = self.model

        def collate(split: Split, indices: list[int]) -> dict[str, Any]:
            return model.collate(split, indices, task, train)

        shard = (0, 1)
        if train:
            shard = (self.accelerator.process_index, self.accelerator.num_processes)
        elif evaluation:
            shard = self.evaluation_shard()

        return SplitLoader(
            split,
            self.model.backbone,
            self.train.batch_size if train else self.train.eval_batch_size,
            task.index,
            shuffle=train,
            seed=self.config.seed,
            device=self.device,
            sort_by_length=not train,
            split_name=split_name or ("train" if train else "test"),
            task_name=task.name,
            collate=collate,
            shard=shard,
            shard_by="batches" if evaluation else "rows",
        )

    def evaluation_shard(self) -> tuple[int, int]:
        """(this process, processes) for test batches: every process a shard, or each process all of them."""
        if self.shard_evaluation:
            return self.accelerator.process_index, self.accelerator.num_processes
        return 0, 1

    def gather_batches(self, local: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """Every process's (batch position, value) pairs of one sharded evaluation, in the one-process batch order,
        so sums over them add the same numbers in the same order as one process would."""
        if self.evaluation_shard()[1] == 1:
            return local
        return sorted(gather_object(local), key=lambda item: item[0])

    def sum_over_processes(self, values: list[int]) -> list[int]:
        """Element-wise sums of counts over the processes of a sharded evaluation (methods' routing tallies)."""
        if self.evaluation_shard()[1] == 1:
            return list(values)
        return [sum(column) for column in zip(*gather_object([list(values)]))]

    # ----- training ----------------------------------------------------------------------------------
    def train_task(self, method: Method, task: Task, epochs: int, lr: float, description: str) -> dict[str, Any]:
        """The optimisation loop for one task; returns samples, steps and seconds."""
        torch.manual_seed(derived_seed(self.config.seed, task.index))  # dropout and any sampling inside methods
        groups = method.parameter_groups(lr, self.train.head_lr)
        parameters = [parameter for group in groups for parameter in group["params"]]
        if not parameters or epochs == 0:
            return {"train_samples": 0, "steps": 0, "train_s": 0.0, "trainable_params": 0}
        optimizer = torch.optim.AdamW(groups, weight_decay=self.train.weight_decay)
        optimizer = self.accelerator.prepare_optimizer(optimizer)
        # the whole training step is one module, so under several processes the module the method runs is the one
        # accelerate prepared (DDP) and its gradient hooks average every parameter's gradient, extra losses included
        step = TrainingStep(method, self.model)
        if self.accelerator.num_processes > 1:
            step = self.accelerator.prepare_model(step)
        loader = self.loader(task.train, task, train=True)
        self.model.train_adapters()
        accumulation = self.train.gradient_accumulation_steps
        samples, steps = 0, 0
        started = time.perf_counter()
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        total_steps = epochs * math.ceil(len(loader) / accumulation)
        for epoch in range(epochs):
            factor = method.epoch_lr_factor(epoch, epochs)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * factor
            bar = tqdm(loader, desc=f"{description} epoch {epoch + 1}/{epochs}", disable=not self.progress, leave=False)
            for batch_index, batch in enumerate(bar):
                with self.accelerator.autocast():
                    loss, total = step(batch)
                if not torch.isfinite(total):
                    raise TrainingDiverged(
                        f"{description}: the loss became {total.item()} (lower train.lr or train.head_lr); finished tasks stay checkpointed"
                    )
                self.accelerator.backward(total / accumulation)
                samples += len(batch["labels"]) * self.accelerator.num_processes  # the global batch
                last_batch = batch_index + 1 == len(loader)
                if (batch_index + 1) % accumulation == 0 or last_batch:
                    if self.train.lr_schedule == "cosine":  # step `steps` of total_steps: lr x (1 + cos(pi s / S)) / 2
                        decay = 0.5 * (1.0 + math.cos(math.pi * steps / total_steps))
                        for group, base_lr in zip(optimizer.param_groups, base_lrs):
                            group["lr"] = base_lr * factor * decay
                    method.after_backward()
                    if self.train.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(parameters, self.train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    method.after_step()
                    steps += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
        elapsed = time.perf_counter() - started
        self.model.eval()
        return {
            "train_samples": samples,
            "steps": steps,
            "train_s": elapsed,
            "trainable_params": sum(parameter.numel() for parameter in parameters),
        }

    DIVERGED = 1.0e4  # a trained value this large (adapters and heads start near 1) means training ran away

    def warn_if_diverging(self, method: Method, task: Task, train_stats: dict[str, Any]) -> None:
        """A warning in run.log and in the task's record when the trained values have run away, so a degenerate
        matrix is not read as a result."""
        trained = [parameter.detach() for parameter in method.trainable_parameters() if parameter.numel()]
        largest = max((float(parameter.abs().max()) for parameter in trained), default=0.0)
        if largest > self.DIVERGED:
            message = f"task {task.name}: a trained value reached {largest:.3g}; training diverged (lower train.lr or train.head_lr)"
            logger.warning("%s: %s", self.entry.run_label, message)
            train_stats["warnings"] = [message]

    def base_session(self, task: Task) -> dict[str, Any]:
        """Task 0 trains the whole backbone and the head (no pre-trained weights offline), then freezes it."""
        for parameter in self.model.backbone.parameters():
            parameter.requires_grad_(True)
        generator = derived_generator(self.config.seed, 0)
        self.model.head.add_classes(task.class_ids, generator=generator)

        trainer = Method(MethodOptions(), MethodContext(self.head, self.train, self.config.seed))
        trainer.model = self.model  # the base class trains every parameter that requires grad
        trainer.current_task = task
        self.model.backbone.train()
        stats = self.train_task(trainer, task, self.train.base_session_epochs, self.train.base_session_lr, "base session")
        self.model.backbone.freeze()
        self.model.head.freeze_all()
        # Saved with task 0's checkpoint under the backbone's own names, before adapters are injected.
        self.base_backbone_state = {key: value.detach().clone() for key, value in self.model.backbone.state_dict().items()}
        return stats

    # ----- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, method: Method, tasks: list[Task]) -> tuple[list[float], int, float]:
        """Accuracy on each task's test split; returns (accuracies, samples, seconds). Under several processes
        each predicts a shard of whole batches; the per-batch sums of every metric are gathered and added in the
        one-process batch order, and the methods' tallies summed, so every process ends with one process's numbers.
        samples counts every process's examples."""
        self.model.eval()
        accuracies, samples = [], 0
        self.other_metrics: dict[str, list[float]] = {}  # per-example metrics beyond accuracy (ROUGE-L), per task
        started = time.perf_counter()
        for task in tasks:
            local: list[tuple[int, tuple[int, dict[str, float]]]] = []
            for position, batch in self.loader(task.test, task, train=False, evaluation=True).numbered():
                predictions = method.predict(batch)
                scores = self.model.example_scores(predictions, batch, task, self.stream.scenario)
                local.append((position, (len(batch["labels"]), {name: float(values.sum()) for name, values in scores.items()})))
            method.after_evaluate_task(task, self.sum_over_processes)
            sums: dict[str, float] = {}
            for _, (size, batch_sums) in self.gather_batches(local):
                for name, total in batch_sums.items():
                    sums[name] = sums.get(name, 0.0) + total
                samples += size
            accuracies.append(sums.get("accuracy", 0.0) / len(task.test))
            for name, total in sums.items():
                if name != "accuracy":
                    self.other_metrics.setdefault(name, []).append(total / len(task.test))
        return accuracies, samples, time.perf_counter() - started

    def score_before_training(self, method: Method, task: Task) -> float | None:
        """a[j-1][j]: accuracy on a task not trained yet, when the model can already score all its classes (head
        rows, or prototypes for the prototype head); None otherwise (eval_next_task)."""
        known = self.model.known_classes()
        return self.evaluate(method, [task])[0][0] if set(task.class_ids) <= known else None

    @torch.no_grad()
    def initial_model_row(self) -> list[float | None]:
        """FWT's b: the untrained model (adapters at their identity start, every class's head rows at the seeded
        values begin_task gives them) scored on each task j over the classes a[j-1][j] is scored on (those of the
        tasks before j; task 0 over its own); None where task j brings new classes, or with the prototype head."""
        tasks = self.stream.tasks
        if self.head.type == "prototype" or not self.model.has_class_head:
            return [None] * len(tasks)
        head = LinearHead(self.model.backbone.hidden_size, self.model.head.cosine_scale)
        for task in tasks:
            head.add_classes(task.class_ids, generator=head_rows_generator(self.config.seed, task.index))
        head.to(self.device)
        self.model.eval()
        row: list[float | None] = []
        seen: set[int] = set()
        for task in tasks:
            allowed = set(task.class_ids) if not seen or self.stream.scenario == "task_incremental" else seen
            if not set(task.class_ids) <= allowed:
                row.append(None)
            else:
                mask = torch.full((head.num_classes,), float("-inf"), device=self.device)
                mask[sorted(allowed)] = 0.0
                local = []
                for position, batch in self.loader(task.test, task, train=False, evaluation=True).numbered():
                    scores = head(self.model.features(batch["inputs"])).float() + mask
                    local.append((position, int((scores.argmax(dim=1) == batch["labels"]).sum())))
                row.append(sum(correct for _, correct in self.gather_batches(local)) / len(task.test))
            seen |= set(task.class_ids)
        return row

    # ----- bookkeeping -------------------------------------------------------------------------------
    @staticmethod
    def stored_bytes(method: Method) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in method.state_dict().values())

    def checkpoint(self, method: Method, task_index: int, with_backbone: bool) -> None:
        if self.run_dir is None or not self.accelerator.is_main_process:
            return
        record = {
            "fingerprint": self.fingerprint,
            "task_index": task_index,
            "records": self.records,
            "extra_state": method.extra_state(),
            "method_entry": {"name": self.entry.name, **self.entry.options.model_dump(mode="json")},
            "backbone_path": self.model.backbone.name_or_path,
            "fused_layouts": fused_layouts(self.model.backbone.model),  # PEFT export folds part LoRAs with these
            # what rebuilding this method without the data needs (loracl export, fuse --run)
            "config": config_to_dict(self.config),
            "method_label": self.entry.run_label,
            "stream": stream_structure(self.stream),
        }
        backbone_state = None
        if with_backbone:  # under the unsplit model's keys, so the file also loads into the original model
            backbone_state = join_part_states(self.base_backbone_state, record["fused_layouts"], prefix="model.")
        save_checkpoint(self.run_dir, task_index, method.state_dict(), record, backbone_state)

    def check_distribution(self, method: Method) -> None:
        """Refuse, in one line, a strategy the engine or the method does not support (before anything trains)."""
        kind = self.accelerator.distributed_type.value
        ignored = sharding_request_ignored(kind, os.environ)
        if ignored is not None and self.accelerator.is_main_process:
            logger.warning(ignored)
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
            raise ConfigError(
                f"accelerate strategy {kind}: not supported yet (methods read and merge whole weight matrices);"
                " launch with plain data parallelism (accelerate launch --multi_gpu)"
            )
        reason = method.multi_process_refusal() if self.accelerator.num_processes > 1 else None
        if reason is not None:
            raise ConfigError(f"method `{self.entry.name}` with {self.accelerator.num_processes} processes: {reason}")

    def wait_for_checkpoint(self) -> None:
        """Every process waits for the main one's checkpoint, so all of them resume from the same task."""
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()

    def task_record(self, method: Method, task: Task, row: list[float], train: dict, evaluation: tuple, wall_s: float) -> dict:
        _, eval_samples, eval_s = evaluation
        return {
            "task": task.name,
            "accuracy_row": row,
            **train,
            "eval_samples": eval_samples,
            "eval_s": eval_s,
            "wall_s": wall_s,  # the task's whole time: set-up, training, end-of-task work, evaluation
            "stored_bytes": self.stored_bytes(method),
            "method_state": copy.deepcopy(method.extra_state()),  # a snapshot: methods keep growing their own lists
            **({"metric_rows": dict(self.other_metrics)} if getattr(self, "other_metrics", None) else {}),
        }

    # ----- the run -----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.train.deterministic:
            torch.use_deterministic_algorithms(True)
        method = self.build()
        self.check_distribution(method)
        tasks = self.stream.tasks
        base_session = self.train.base_session_epochs > 0
        if self.train.eval_next_task:
            check_next_task_evaluation(method, self.entry.name, self.stream, base_session)
        finished = self._resume_if_possible(method, base_session)
        if method.trains_jointly:
            if finished == 0:
                self._run_joint(method, base_session)
        else:
            if finished == 0 and not base_session:
                method.attach(self.model)
            for task in tasks[finished:]:
                self._run_task(method, task, base_session)
        outside_tasks = time.perf_counter() - started - sum(record["wall_s"] for record in self.records[finished:])
        results = self.results(method, outside_tasks)
        return RunResult(self.entry.run_label, results, self.run_dir, method)

    def _run_task(self, method: Method, task: Task, base_session: bool) -> None:
        """Train (or base-train) one task, evaluate every task seen so far, checkpoint."""
        tasks = self.stream.tasks
        started = time.perf_counter()
        description = f"{self.entry.run_label} task {task.index + 1}/{len(tasks)}"
        if task.index == 0 and base_session:
            train_stats = {**self.base_session(task), "base_session": True}
            method.attach(self.model)
            method.absorb_base_session(task, self.loader(task.train, task, train=False, split_name="train"))
        else:
            method.begin_task(task)
            method.prepare_task(task, self.loader(task.train, task, train=False, split_name="train"))
            before_training = self.initial_model_row() if task.index == 0 and self.train.eval_next_task else None
            train_stats = self.train_task(method, task, self.train.epochs, self.train.lr, description)
            self.warn_if_diverging(method, task, train_stats)
            method.end_task(task, self.loader(task.train, task, train=False, split_name="train"))
            if before_training is not None:
                train_stats["before_training_row"] = before_training
        evaluation = self.evaluate(method, tasks[: task.index + 1])
        row = evaluation[0] + [None] * (len(tasks) - task.index - 1)
        if self.train.eval_next_task and task.index + 1 < len(tasks):
            row[task.index + 1] = self.score_before_training(method, tasks[task.index + 1])
        self.records.append(self.task_record(method, task, row, train_stats, evaluation, time.perf_counter() - started))
        logger.info("%s: after task %s accuracy %s", self.entry.run_label, task.name, [round(a, 4) for a in evaluation[0]])
        self.checkpoint(method, task.index, with_backbone=base_session and task.index == 0)
        self.wait_for_checkpoint()

    def _run_joint(self, method: Method, base_session: bool) -> None:
        started = time.perf_counter()
        joint = _joint_task(self.stream)
        if base_session:
            self.base_session(self.stream.tasks[0])
        method.attach(self.model)
        method.begin_task(joint)
        train_stats = self.train_task(method, joint, self.train.epochs, self.train.lr, f"{self.entry.run_label} all tasks")
        method.end_task(joint, self.loader(joint.train, joint, train=False, split_name="train"))
        evaluation = self.evaluate(method, self.stream.tasks)
        self.records.append(self.task_record(method, joint, evaluation[0], train_stats, evaluation, time.perf_counter() - started))
        self.checkpoint(method, 0, with_backbone=base_session)

    def _resume_if_possible(self, method: Method, base_session: bool) -> int:
        """Load the latest finished task's checkpoint; returns how many tasks are already done."""
        if self.run_dir is None:
            return 0
        folder = None
        for candidate in finished_checkpoints(self.run_dir):  # newest first; a corrupt one falls back to the one before
            try:
                read_checkpoint(candidate, self.fingerprint)
            except CorruptCheckpoint as error:
                logger.warning("%s: %s; trying the checkpoint before it", self.entry.run_label, error)
                continue
            folder = candidate
            break
        if folder is None:
            if finished_checkpoints(self.run_dir):
                raise CheckpointError(f"no readable checkpoint in {self.run_dir}/checkpoints; delete that folder to start again")
            return 0
        record = self.restore(method, folder, base_session)
        self.records = list(record["records"])
        finished = len(self.stream.tasks) if method.trains_jointly else int(record["task_index"]) + 1
        logger.info("%s: resumed after %d finished task(s) from %s", self.entry.run_label, finished, folder)
        return finished

    def restore(self, method: Method, folder: Path, base_session: bool) -> dict[str, Any]:
        """Attach `method` to the built model and load checkpoint `folder` into both; returns its record."""
        record, state, backbone_state = read_checkpoint(folder, self.fingerprint)
        layouts = fused_layouts(self.model.backbone.model)
        saved_layouts = {name: [tuple(part) for part in layout] for name, layout in record.get("fused_layouts", {}).items()}
        if saved_layouts != layouts:  # e.g. a reordered {part: rows} rule: same fingerprint, other rows per part
            raise CheckpointError(
                f"checkpoint {folder} was written with the fused projections split as {saved_layouts or 'none'}, "
                f"this run splits them as {layouts or 'none'} (backbone.split_fused); use the original rule or a new --out"
            )
        if backbone_state is not None:
            self.model.backbone.load_state_dict(split_part_states(backbone_state, layouts, prefix="model."))
        method.attach(self.model)
        if method.trains_jointly:
            if base_session:
                self.model.head.add_classes(self.stream.tasks[0].class_ids)
            method.restore_structure([_joint_task(self.stream)], base_session=False)
        else:
            finished = int(record["task_index"]) + 1
            method.restore_structure(self.stream.tasks[:finished], base_session=base_session)
        try:
            method.load_state_dict(state)
        except KeyError as error:  # e.g. a checkpoint written by an older layout of the method's tensors
            raise LoraclError(
                f"checkpoint {folder} does not fit method `{self.entry.name}` as this version builds it: {error.args[0]};"
                " start a fresh --out or delete that run folder"
            ) from error
        method.load_extra_state(record.get("extra_state", {}))
        return record

    def results(self, method: Method, outside_tasks_s: float) -> dict[str, Any]:
        """The run's summary; wall time sums every task's, across resumed sessions, plus this session's set-up."""
        matrix = [record["accuracy_row"] for record in self.records]
        test_sizes = [len(task.test) for task in self.stream.tasks]
        before_training = self.records[0].get("before_training_row") if self.records else None
        # The base session trains the whole backbone, not the method: it stays out of the method's speed.
        method_records = [record for record in self.records if not record.get("base_session")]
        train_samples = sum(record["train_samples"] for record in method_records)
        train_s = sum(record["train_s"] for record in method_records)
        steps = sum(record["steps"] for record in method_records)
        eval_samples = sum(record["eval_samples"] for record in self.records)
        eval_s = sum(record["eval_s"] for record in self.records)
        cumulative = [record["stored_bytes"] for record in self.records]
        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.entry.name,
            "label": self.entry.run_label,
            "method_options": self.entry.options.model_dump(mode="json"),
            "head": self.head.model_dump(mode="json"),
            "stream": self.stream.summary(),
            "backbone": self.model.backbone.describe(),
            "seed": self.config.seed,
            "accuracy_matrix": matrix,
            "test_sizes": test_sizes,
            **metrics.summarize(matrix, test_sizes, before_training),
            **({"before_training": before_training} if before_training is not None else {}),
            "trainable_params_per_task": [record["trainable_params"] for record in self.records],
            "stored_bytes_per_task": [b - a for a, b in zip([0] + cumulative[:-1], cumulative)],
            "stored_bytes_cumulative": cumulative,
            "train_samples_per_s": train_samples / train_s if train_s > 0 else None,
            "train_step_s": train_s / steps if steps else None,
            "eval_samples_per_s": eval_samples / eval_s if eval_s > 0 else None,
            "peak_memory_bytes": _peak_memory_bytes(self.device),
            "wall_s": outside_tasks_s + sum(_task_wall_s(record) for record in self.records),
            "per_task": self.records,
            "method_metrics": method.task_metrics(),
            "config_fingerprint": self.fingerprint,
            "versions": _versions(),
        }


def configured_backbone(config: RunConfig) -> Any:
    """The config's backbone, frozen, its fused projections split as `backbone.split_fused` says."""
    section = config.backbone
    return load_backbone(
        section.name,
        section.pooling,
        config.train.max_length,
        seed=config.seed,
        local_files_only=section.local_files_only,
        split_fused=section.split_fused,
        kind=config.task_model.kind,
    )


def build_method(config: RunConfig, entry: MethodConfig, stream: Stream) -> Method:
    """The entry's method object with what it may know of the run (not attached to a model yet)."""
    context = MethodContext(config.head_for(entry), config.train, config.seed, stream.scenario, len(stream))
    return create_method(entry.name, entry.options, context)


def check_task_model_settings(config: RunConfig, entry: MethodConfig, backbone: Any) -> None:
    """What has meaning only for a classifier head is refused, in one line, on a language model."""
    from loracl.backbones.language import LanguageBackbone

    if not isinstance(backbone, LanguageBackbone) or config.task_model.kind == "classifier":
        return
    head = config.head_for(entry)
    where = f"method `{entry.name}`" if entry.head is not None else "head"
    if head.type != "linear" or head.align:
        raise ConfigError(
            f"{where}: head.type {head.type}{' with align' if head.align else ''} has meaning only for a classifier"
            " head; a language model answers with its own vocabulary head (remove the head section)"
        )
    if config.train.base_session_epochs:
        raise ConfigError("train.base_session_epochs: a language model is pre-trained; there is no base session")
    if config.train.eval_next_task:
        raise ConfigError("train.eval_next_task: not available for language models (the zero_shot row is the floor)")


def check_next_task_evaluation(method: Method, name: str, stream: Stream, base_session: bool) -> None:
    """train.eval_next_task needs a method that can score unseen tasks and a stream where some task reuses
    earlier classes; anything else is a config error, not a silent absence of FWT."""
    if not method.scores_unseen_tasks:
        raise ConfigError(f"train.eval_next_task: method `{name}` routes by statistics of finished tasks and cannot score a task before training it")
    if method.trains_jointly:
        raise ConfigError(f"train.eval_next_task: method `{name}` trains on every task at once, so no task comes next")
    if base_session:
        raise ConfigError("train.eval_next_task: needs a stream trained task by task without a base session")
    seen: set[int] = set()
    reused = False
    for task in stream.tasks:
        reused = reused or (bool(seen) and set(task.class_ids) <= seen)
        seen |= set(task.class_ids)
    if not reused:
        raise ConfigError(
            "train.eval_next_task: no task of this stream uses only classes of earlier tasks, so none can be scored"
            " before training (use scenario domain_incremental or label_space by_name)"
        )


def check_entries(config: RunConfig, stream: Stream) -> None:
    """Every entry's method built (options, head and flags checked) and attached to a copy of the backbone
    before anything trains, so a bad later entry cannot leave an earlier entry's outputs half a run behind, and
    what only the model can reveal (targets matching nothing, a prompt deeper than the model) is not found
    after a base session has trained for minutes."""
    methods = []
    for entry in config.method:
        method = build_method(config, entry, stream)
        if config.train.eval_next_task:
            check_next_task_evaluation(method, entry.name, stream, config.train.base_session_epochs > 0)
        methods.append((entry, method))
    backbone = configured_backbone(config)
    check_stream_fits_backbone(stream, backbone)
    for entry, method in methods:
        head = config.head_for(entry)
        check_task_model_settings(config, entry, backbone)
        trial = build_task_model(copy.deepcopy(backbone), config, head)
        trial.check_stream(stream)
        method.attach(trial)  # the method object is thrown away with its trial model; runs build their own


def run_method(config: RunConfig, entry: MethodConfig, stream: Stream, run_dir: Path | None = None) -> RunResult:
    """Train and evaluate one method entry on a stream; resumes from run_dir's checkpoints if present."""
    return MethodRun(config, entry, stream, run_dir).run()


def run_experiment(config: RunConfig, out_dir: str | Path | None = None, stream: Stream | None = None) -> list[RunResult]:
    """Every method entry of the config on one stream; writes OUT/ (results, report, plots) when given."""
    from accelerate import PartialState

    from loracl.report import write_run_outputs, write_summary_outputs

    stream = stream if stream is not None else load_stream(config.stream, config.seed)
    out = Path(out_dir) if out_dir is not None else None
    # under several processes only the main one writes; the same cpu flag as MethodRun's Accelerator, since the
    # first state built decides for the whole process (without it a CPU machine is taken as one process)
    main_process = PartialState(cpu=config.train.cpu or not torch.cuda.is_available()).is_main_process
    check_entries(config, stream)
    results = []
    for entry in config.method:
        run_dir = out / entry.run_label if out is not None else None
        created = run_dir is not None and not run_dir.exists()
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = run_method(config, entry, stream, run_dir)
        except LoraclError:
            if created and run_dir is not None and not any(run_dir.iterdir()):
                run_dir.rmdir()  # refused before writing anything (e.g. a stream the backbone cannot read)
            raise
        if run_dir is not None and main_process:
            write_run_outputs(result.results, run_dir)
        results.append(result)
    if out is not None and main_process:
        write_summary_outputs([result.results for result in results], out, config_to_dict(config))
    return results


__all__ = ["MethodRun", "RunResult", "run_experiment", "run_method"]
