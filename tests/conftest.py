import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Tiny test models gain nothing from intra-op threads, and thread hand-offs dominate their run time.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tasks():  # noqa: ANN201 - (Task, Task)
    """The two tiny text tasks of the option-effect tests (helpers.two_text_tasks), built once per module."""
    from helpers import two_text_tasks

    return two_text_tasks()


@pytest.fixture(scope="module")
def first(tasks):  # noqa: ANN001, ANN201
    """Task 0 of `tasks`."""
    return tasks[0]


@pytest.fixture(scope="module")
def second(tasks):  # noqa: ANN001, ANN201
    """Task 1 of `tasks`."""
    return tasks[1]
