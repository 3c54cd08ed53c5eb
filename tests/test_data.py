"""Streams and sources: class ids, scenarios, sub-sampling, and every malformed input a user can give."""

import json

import numpy as np
import pytest
from helpers import synthetic_text_tasks

from loracl.config import StreamConfig
from loracl.data import build_stream, load_stream
from loracl.data.sources.image_folder import load_image_folder
from loracl.data.sources.json_dir import load_json_dir
from loracl.data.stream import RawTask
from loracl.errors import DataError


def write_task(root, name, labels, train, test):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps([{"label": l, "sentence": s} for s, l in train]))
    (folder / "test.json").write_text(json.dumps([{"label": l, "sentence": s} for s, l in test]))


def test_per_task_label_space_namespaces_classes():
    tasks = [
        RawTask("a", ["True", "False"], [("x", "True"), ("y", "False")], [("z", "True")]),
        RawTask("b", ["True", "False"], [("x", "True"), ("y", "False")], [("z", "False")]),
    ]
    stream = build_stream(tasks)
    assert stream.class_names == ["a:True", "a:False", "b:True", "b:False"]
    assert stream.tasks[1].class_ids == [2, 3] and stream.tasks[1].test.labels == [3]
    shared = build_stream(tasks, label_space="by_name", scenario="domain_incremental")
    assert shared.class_names == ["True", "False"] and shared.tasks[1].class_ids == [0, 1]
    positional = build_stream(tasks, scenario="domain_incremental")
    assert positional.class_names == ["#0", "#1"]


def test_subsampling_is_deterministic_per_seed():
    raw = synthetic_text_tasks(2, train=50, test=20)
    first = build_stream(raw, max_train_per_task=10, seed=3)
    again = build_stream(raw, max_train_per_task=10, seed=3)
    other = build_stream(raw, max_train_per_task=10, seed=4)
    assert first.tasks[0].train.inputs == again.tasks[0].train.inputs
    assert first.tasks[0].train.inputs != other.tasks[0].train.inputs
    assert len(first.tasks[0].train) == 10 and len(first.tasks[0].test) == 20


def test_task_order_shuffle_is_seeded():
    """The same seed gives the same order; the order is a permutation that moves tasks, and another seed gives
    another one (seeds 1 and 3 happen to draw different orders of the 120); without the switch, the given order."""
    raw = synthetic_text_tasks(5)
    original = [t.name for t in raw]

    def order(seed, shuffle=True):
        return [t.name for t in build_stream(raw, shuffle_task_order=shuffle, seed=seed).tasks]

    names = order(1)
    assert sorted(names) == original and names != original
    assert names == order(1)
    assert order(3) != names and sorted(order(3)) == original
    assert order(1, shuffle=False) == original
    assert [t.index for t in build_stream(raw, shuffle_task_order=True, seed=1).tasks] == [0, 1, 2, 3, 4]  # positions renumbered


def test_json_dir_reads_the_shared_layout(tmp_path):
    write_task(tmp_path, "t1", ["pos", "neg"], [("good", "pos"), ("bad", "neg")], [("fine", "pos")])
    [task] = load_json_dir(tmp_path)
    assert task.labels == ["pos", "neg"] and task.train[0] == ("good", "pos")
    stream = load_stream(StreamConfig(source="json_dir", path=str(tmp_path), tasks=["t1"]))
    assert stream.num_classes == 2


def test_missing_directory_and_task(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_json_dir(tmp_path / "nowhere")
    write_task(tmp_path, "t1", ["a"], [("x", "a")], [("y", "a")])
    with pytest.raises(DataError, match="`t2` not found"):
        load_json_dir(tmp_path, ["t2"])


def test_task_with_no_examples(tmp_path):
    write_task(tmp_path, "empty", ["a", "b"], [], [("y", "a")])
    with pytest.raises(DataError, match="`empty`.*train split has no examples"):
        build_stream(load_json_dir(tmp_path))


def test_label_not_in_labels_json(tmp_path):
    write_task(tmp_path, "t1", ["a", "b"], [("x", "a"), ("y", "c")], [("z", "a")])
    with pytest.raises(DataError, match="'c' is not one of its labels"):
        build_stream(load_json_dir(tmp_path))


def test_malformed_json_names_the_file(tmp_path):
    write_task(tmp_path, "t1", ["a"], [("x", "a")], [("y", "a")])
    (tmp_path / "t1" / "train.json").write_text('[{"label": "a", "sentence": "x"')
    with pytest.raises(DataError, match="malformed JSON in .*train.json"):
        load_json_dir(tmp_path)
    (tmp_path / "t1" / "train.json").write_text('[{"label": "a"}]')
    with pytest.raises(DataError, match="needs the keys"):
        load_json_dir(tmp_path)


def test_digits_stream_has_five_tasks_of_two_digits():
    stream = load_stream(StreamConfig(source="digits"))
    assert len(stream) == 5 and all(len(task.class_ids) == 2 for task in stream.tasks)
    assert stream.modality == "image" and stream.tasks[0].train.inputs[0].shape == (1, 8, 8)
    train_total = sum(len(t.train) for t in stream.tasks)
    test_total = sum(len(t.test) for t in stream.tasks)
    assert train_total + test_total == 1797


def test_image_folder_and_wrong_image_size(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "pets" / split / label
            folder.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "0.png")
    [task] = load_image_folder(tmp_path, None, image_size=8)
    assert task.labels == ["cat", "dog"] and task.train[0][0].shape == (3, 8, 8)
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(tmp_path / "pets" / "train" / "dog" / "1.png")
    with pytest.raises(DataError, match=r"1.png is 8x9, expected 8x8"):
        load_image_folder(tmp_path, None, image_size=8)


def test_hf_source_offline_is_one_clear_error():
    from loracl.errors import LoraclError

    with pytest.raises(LoraclError, match="datasets|could not be loaded"):
        load_stream(StreamConfig(source="hf", path="definitely/not-a-cached-dataset"))
