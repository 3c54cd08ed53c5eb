"""From a StreamConfig to a Stream: pick the source, read its tasks, build the scenario."""

from __future__ import annotations

from loracl.config import StreamConfig
from loracl.data.stream import Stream, build_stream
from loracl.errors import ConfigError

SOURCES = {
    "packaged": "the embedded quickstart text tasks shipped inside loracl",
    "packaged_instruct": "the embedded instruction tasks (with instruction.txt) for language models",
    "json_dir": "folders of labels.json / train.json / test.json (the shared benchmark layout)",
    "digits": "scikit-learn's 8x8 digits, tasks of consecutive digits",
    "hf": "a Hugging Face dataset by name (needs `datasets` and the cache or network)",
    "image_folder": "<root>/<task>/{train,test}/<class>/<images>",
}


def load_stream(config: StreamConfig, seed: int = 0) -> Stream:
    """Read the configured source and return the stream (validated, sub-sampled, ordered)."""
    modality = "text"
    if config.source == "packaged":
        from loracl.data.sources.json_dir import load_json_dir
        from loracl.resources import quickstart_data_dir

        raw = load_json_dir(quickstart_data_dir(), config.tasks)
        description = "packaged quickstart text stream"
    elif config.source == "packaged_instruct":
        from loracl.data.sources.json_dir import load_json_dir
        from loracl.resources import instruct_data_dir

        raw = load_json_dir(instruct_data_dir(), config.tasks or ["sst2", "qqp", "cb"])
        description = "packaged instruction stream"
    elif config.source == "json_dir":
        from loracl.data.sources.json_dir import load_json_dir

        if not config.path:
            raise ConfigError("stream.path: the json_dir source needs a directory")
        raw = load_json_dir(config.path, config.tasks)
        description = f"json_dir {config.path}"
    elif config.source == "digits":
        from loracl.data.sources.digits import load_digits_tasks

        raw = load_digits_tasks(config.classes_per_task, config.test_fraction, seed)
        if config.tasks is not None:
            raise ConfigError("stream.tasks: the digits source makes its own tasks; use classes_per_task")
        modality = "image"
        description = "sklearn digits"
    elif config.source == "hf":
        from loracl.data.sources.hf import load_hf_tasks

        if not config.path:
            raise ConfigError("stream.path: the hf source needs a dataset name")
        raw = load_hf_tasks(config.path, config.tasks, config.text_column, config.label_column)
        description = f"hf {config.path}"
    elif config.source == "image_folder":
        from loracl.data.sources.image_folder import load_image_folder

        if not config.path:
            raise ConfigError("stream.path: the image_folder source needs a directory")
        raw = load_image_folder(config.path, config.tasks, config.image_size)
        modality = "image"
        description = f"image_folder {config.path}"
    else:  # pragma: no cover - the config type admits only the names above
        raise ConfigError(f"stream.source: unknown source {config.source!r}")
    if config.max_tasks is not None:
        raw = raw[: config.max_tasks]
    return build_stream(
        raw,
        scenario=config.scenario,
        label_space=config.label_space,
        max_train_per_task=config.max_train_per_task,
        max_test_per_task=config.max_test_per_task,
        seed=seed,
        shuffle_task_order=config.shuffle_task_order,
        modality=modality,
        description=description,
    )
