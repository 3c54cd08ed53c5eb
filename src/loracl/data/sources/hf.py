"""A Hugging Face dataset by name: one task per listed config (or one task), text or image + label columns."""

from __future__ import annotations

from typing import Any

from loracl.data.stream import RawTask
from loracl.errors import DataError, MissingDependencyError


def load_hf_tasks(
    name: str, tasks: list[str] | None, text_column: str, label_column: str, local_files_only: bool = True
) -> list[RawTask]:
    """Load `name` (each of `tasks` as a dataset config) with `datasets`; offline, one clear error."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError('the hf source needs the `datasets` package: pip install "loracl[hf]"') from None
    raw_tasks = []
    for config_name in tasks or [None]:
        label = f"{name}" + (f"/{config_name}" if config_name else "")
        try:
            if local_files_only:
                datasets.config.HF_HUB_OFFLINE = True
            dataset = datasets.load_dataset(name, config_name)
        except Exception as exc:  # datasets raises many types for "not cached and offline"
            raise DataError(
                f"Hugging Face dataset `{label}` could not be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                "it must be in the local cache or reachable online (set backbone.local_files_only: false)"
            ) from None
        if "train" not in dataset or ("test" not in dataset and "validation" not in dataset):
            raise DataError(f"dataset `{label}` needs a train and a test (or validation) split, has {list(dataset)}")
        test_split = dataset["test"] if "test" in dataset else dataset["validation"]
        for column in (text_column, label_column):
            if column not in dataset["train"].column_names:
                raise DataError(f"dataset `{label}` has no column `{column}` (columns: {dataset['train'].column_names})")
        feature = dataset["train"].features[label_column]
        names: list[str] = list(getattr(feature, "names", []) or [])

        def pairs(split: Any) -> list[tuple[Any, str]]:
            return [
                (row[text_column], names[row[label_column]] if names else str(row[label_column])) for row in split
            ]

        train, test = pairs(dataset["train"]), pairs(test_split)
        labels = names or sorted({label for _, label in train})
        raw_tasks.append(RawTask(config_name or name, labels, train, test, origin=f"hf:{label}"))
    return raw_tasks
