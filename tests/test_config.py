"""Config loading: defaults, overrides, and one clear error per bad key or value."""

from pathlib import Path

import pytest
import torch

from loracl.config import load_config, validate_config
from loracl.errors import ConfigError


def test_embedded_quickstart_loads_with_defaults():
    config = load_config(None)
    assert config.backbone.name == "minilm-l6"
    assert config.stream.source == "packaged"
    assert [entry.run_label for entry in config.method][:2] == ["probe+prototype", "probe"]


def test_every_key_has_a_default():
    config = validate_config({})
    assert config.seed == 0 and config.method[0].name == "seq_lora"


def test_overrides_reach_nested_keys_and_every_method_entry(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  - {name: seq_lora}\n  - {name: inc_lora}\n")
    config = load_config(path, ["train.lr=1e-3", "method.rank=4", "stream.tasks=[a, b]"])
    assert config.train.lr == pytest.approx(1e-3)
    assert all(entry.options.rank == 4 for entry in config.method)
    assert config.stream.tasks == ["a", "b"]


@pytest.mark.parametrize(
    "data, culprit",
    [
        ({"trian": {}}, "trian"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"epochs": "two"}}, "train.epochs"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"stream": {"scenario": "sideways"}}, "stream.scenario"),
        ({"method": {"name": "no_such_method"}}, "no_such_method"),
        ({"method": {"name": "seq_lora", "rnak": 4}}, "rnak"),
        ({"method": {"name": "seq_lora", "rank": "big"}}, "rank"),
        ({"method": [{"name": "seq_lora"}, {"name": "seq_lora"}]}, "unique"),
        ({"head": {"type": "tree"}}, "head.type"),
        ({"head": {"type": "cosine", "cosine_scale": 0}}, "head.cosine_scale"),
        ({"head": {"cosine_scale": "big"}}, "head.cosine_scale"),
        ({"method": {"name": "seq_lora", "dropout": 1.0}}, "dropout"),
        ({"head": {"type": "prototype", "align": True}}, "head.align"),
        ({"head": {"align": True, "align_epochs": 0}}, "head.align_epochs"),
        ({"head": {"align": "yes"}}, "head.align"),
    ],
)
def test_bad_values_name_the_culprit(data, culprit):
    with pytest.raises(ConfigError, match=culprit):
        validate_config(data)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


METHODS_WITHOUT_ADAPTERS = {"probe", "zero_shot"}  # a frozen backbone and a head (probe) or nothing (zero_shot)


def _two_example_batch(model, kind, modality):
    """A first task of two classes and a batch of two of its training examples, as the engine collates them."""
    from helpers import tiny_digits_stream, tiny_text_stream

    from loracl.data.stream import RawTask, build_stream
    from loracl.engine.loaders import SplitLoader

    if kind == "language":
        pairs = [("a ruby", "red"), ("the sea", "blue")]
        stream = build_stream([RawTask("colour", ["red", "blue"], pairs, pairs, instruction="Name the colour.")])
    elif modality == "image":
        stream = tiny_digits_stream(1, max_train=2, max_test=2)
    else:
        stream = tiny_text_stream(1, train=2, test=2)
    task = stream.tasks[0]
    loader = SplitLoader(
        task.train, model.backbone, 2, task.index, device=torch.device("cpu"), sort_by_length=True, split_name="train",
        task_name=task.name, collate=lambda split, indices: model.collate(split, indices, task, True),
    )
    [batch] = list(loader)
    return task, batch


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")))
def test_every_method_entry_of_a_shipped_config_attaches_to_a_tiny_model_of_its_modality(path):
    """Each entry's method, built from the shipped options on a tiny backbone: adapter methods wrap or add modules
    in the backbone (its state gets new keys), the others leave it as it was; a training forward on two examples of a two-class first task gives
    [2, 2] class logits (classifier) or one vocabulary row per answer token (language model)."""
    from loracl.backbones.classifier import ContinualClassifier
    from loracl.backbones.registry import load_backbone
    from loracl.methods.base import MethodContext
    from loracl.methods.registry import create_method
    from loracl.task_models import build_task_model
    from loracl.task_models.language import IGNORE

    config = load_config(path)
    language = config.task_model.kind == "language"
    image = config.stream.source in ("digits", "image_folder")
    tiny = "tiny-vit" if image else ("tiny-llama" if language else "tiny-bert")
    for entry in config.method:
        where = f"{path.name}: {entry.run_label}"
        context = MethodContext(config.head_for(entry), config.train, config.seed, config.stream.scenario, 5)
        method = create_method(entry.name, entry.options, context)
        backbone = load_backbone(tiny, seed=0)
        bare = set(backbone.model.state_dict())
        model = build_task_model(backbone, config, config.head_for(entry)) if language else ContinualClassifier(backbone)
        method.attach(model)
        assert method.model is model, f"{where} did not attach"
        added = set(backbone.model.state_dict()) - bare
        if entry.name in METHODS_WITHOUT_ADAPTERS:
            assert not added, f"{where} changed the backbone: {sorted(added)[:3]}"
        else:
            assert added, f"{where} injected no adapter into the backbone"
        task, batch = _two_example_batch(model, config.task_model.kind, "image" if image else "text")
        method.begin_task(task)
        model.eval()
        with torch.no_grad():
            outputs = method.forward(batch)
        if language:
            answer_tokens = int((batch["inputs"]["target_ids"][:, 1:] != IGNORE).sum())
            assert answer_tokens >= 2 and outputs.shape == (answer_tokens, backbone.model.config.vocab_size), where
        else:
            assert outputs.shape == (2, 2), where
        assert torch.isfinite(outputs).all(), where
