"""Config loading: defaults, overrides, and one clear error per bad key or value."""

from pathlib import Path

import pytest

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


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")))
def test_every_method_entry_of_a_shipped_config_attaches_to_a_tiny_model_of_its_modality(path):
    from loracl.backbones.classifier import ContinualClassifier
    from loracl.backbones.registry import load_backbone
    from loracl.methods.base import MethodContext
    from loracl.methods.registry import create_method
    from loracl.task_models import build_task_model

    config = load_config(path)
    language = config.task_model.kind == "language"
    tiny = "tiny-vit" if config.stream.source in ("digits", "image_folder") else ("tiny-llama" if language else "tiny-bert")
    for entry in config.method:
        context = MethodContext(config.head_for(entry), config.train, config.seed, config.stream.scenario, 5)
        method = create_method(entry.name, entry.options, context)
        backbone = load_backbone(tiny, seed=0)
        method.attach(build_task_model(backbone, config, config.head_for(entry)) if language else ContinualClassifier(backbone))
        assert method.model is not None, f"{path.name}: {entry.run_label} did not attach"
