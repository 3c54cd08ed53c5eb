"""train.compile: the backbone's blocks run through torch.compile and the results are those of the eager run.

The runs use `compile_backend: aot_eager`: dynamo traces the blocks with their adapters and AOTAutograd builds the
forward and backward graphs, as with inductor, but the eager kernels run them, so a tiny model compiles in seconds
on a busy CPU (inductor generates and builds C++ for every graph: three tiny-BERT tasks took 31 s against 4.5 s).
What inductor's kernels change beyond the tracing, its random numbers for dropout, is checked on one tiny graph.
Skipped where torch.compile is unavailable.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from helpers import tiny_config, tiny_text_stream
from test_contract import first_test_batch

from loracl.adapters import AdapterLayer
from loracl.backbones.compiled import CompiledCall, check_compile
from loracl.config import validate_config
from loracl.data.stream import RawTask, build_stream
from loracl.engine import run_experiment
from loracl.engine.checkpoint import config_fingerprint
from loracl.errors import ConfigError

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")

COMPILED = {"compile": True, "compile_backend": "aot_eager"}


def run_both(config_for: Any, stream: Any) -> tuple[Any, Any, dict[str, float]]:
    """The same config run eagerly and compiled; returns both results and their wall times."""
    torch._dynamo.reset()
    results, seconds, graphs = [], {}, {}
    for name, switch in (("eager", {}), ("compiled", COMPILED)):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        started = time.perf_counter()
        [result] = run_experiment(config_for(switch), stream=stream)
        seconds[name] = time.perf_counter() - started
        graphs[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        results.append(result)
    assert graphs == {"eager": 0, "compiled": graphs["compiled"]} and graphs["compiled"] > 0, graphs
    return results[0], results[1], seconds


def eager_again(model: torch.nn.Module) -> None:
    """Undo train.compile on a model: every block calls its eager forward again."""
    for module in model.modules():
        if isinstance(module._compiled_call_impl, CompiledCall):
            module._compiled_call_impl = None


def assert_same_state(eager: Any, compiled: Any, atol: float) -> None:
    first, second = eager.method.state_dict(), compiled.method.state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.allclose(value.float(), second[key].float(), atol=atol, rtol=0), (key, (value.float() - second[key].float()).abs().max())


def test_compiled_classifier_run_gives_the_eager_accuracy_matrix_state_and_logits() -> None:
    """inc_lora adds a branch per task (a new adapter layout, so recompiles) and routes none; the matrix, the trained
    tensors, the logits and the hooked read-outs (block features: eager under a hook) match the eager run."""
    stream = tiny_text_stream(2, train=16, test=8)
    eager, compiled, seconds = run_both(lambda switch: tiny_config("inc_lora", train=switch), stream)
    print(f"tiny-bert inc_lora, 2 tasks: eager {seconds['eager']:.1f} s, compiled (aot_eager) {seconds['compiled']:.1f} s")
    assert compiled.accuracy_matrix == eager.accuracy_matrix
    assert_same_state(eager, compiled, atol=1e-6)

    model = compiled.method.model
    blocks = model.backbone.blocks()
    assert all(isinstance(block._compiled_call_impl, CompiledCall) for block in blocks)
    batch = first_test_batch(compiled, stream, task_index=1)
    with torch.no_grad():
        logits, features = compiled.method.predict(batch), model.backbone.block_features(1, **batch["inputs"])
        with model.backbone.capture_block_output(len(blocks)) as captured:  # a hook on the last block: it runs eagerly
            model.features(batch["inputs"])
        calls: list[str] = []  # a pre-hook inside a compiled block (covariance passes): the block runs eagerly
        handle = next(layer for layer in blocks[0].modules() if isinstance(layer, AdapterLayer)).register_forward_pre_hook(
            lambda layer, args: calls.append(layer.module_name)
        )
        model.features(batch["inputs"])
        handle.remove()
        assert len(calls) == 1
        eager_again(model)
        with model.backbone.capture_block_output(len(blocks)) as captured_eagerly:
            model.features(batch["inputs"])
        assert torch.allclose(logits, compiled.method.predict(batch), atol=1e-5, rtol=0)
        assert torch.allclose(logits, eager.method.predict(batch), atol=1e-5, rtol=0)
        assert torch.allclose(features, model.backbone.block_features(1, **batch["inputs"]), atol=1e-5, rtol=0)
        assert torch.allclose(_first_tensor(captured), _first_tensor(captured_eagerly), atol=1e-5, rtol=0)


def _first_tensor(captured: list[Any]) -> torch.Tensor:
    """The hidden states in a recorded block output (a tensor, or a tuple that starts with one)."""
    output = captured[0]
    return output[0] if isinstance(output, tuple) else output


def test_compiled_language_model_trains_as_eager_and_generates_eagerly() -> None:
    """tiny-llama: training runs compiled blocks (no cache: the engine asks for none), greedy generation carries a
    key/value cache and so runs eagerly; the trained tensors and the generated answers match the eager run."""
    stream = build_stream([
        RawTask("colour", ["red", "blue"], [("a ruby", "red"), ("the sea", "blue")] * 3, [("a ruby", "red"), ("the sea", "blue")]),
        RawTask("size", ["big", "tiny"], [("a whale", "big"), ("an ant", "tiny")] * 3, [("a whale", "big"), ("an ant", "tiny")]),
    ])  # both tasks' batches as long: fewer shapes to compile for

    def config_for(switch: dict[str, Any]) -> Any:
        train = {"max_length": 192, "lr": 1e-2, "batch_size": 6, "eval_batch_size": 8, **switch}  # one step a task
        return tiny_config("seq_lora", "tiny-llama", train=train, task_model={"kind": "language", "max_new_tokens": 4})

    eager, compiled, seconds = run_both(config_for, stream)
    print(f"tiny-llama seq_lora: eager {seconds['eager']:.1f} s, compiled (aot_eager) {seconds['compiled']:.1f} s")
    assert compiled.accuracy_matrix == eager.accuracy_matrix
    assert_same_state(eager, compiled, atol=1e-4)
    batch = first_test_batch(compiled, stream, task_index=len(stream) - 1)
    with torch.no_grad():
        answers = compiled.method.predict(batch)
        eager_again(compiled.method.model)
        assert torch.equal(answers, compiled.method.predict(batch))
        assert torch.equal(answers, eager.method.predict(batch))


def test_compile_settings_are_checked_and_stay_out_of_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="train.compile_backend has an effect only with train.compile: true"):
        validate_config({"train": {"compile_backend": "aot_eager"}})
    plain, compiled = validate_config({}), validate_config({"train": {"compile": True}})
    assert config_fingerprint(plain.model_dump(mode="json")) == config_fingerprint(compiled.model_dump(mode="json"))

    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*aot_eager"):
        check_compile("inductor", torch.device("cpu"))
    check_compile("aot_eager", torch.device("cpu"))  # needs no compiler


def test_inductor_draws_dropout_masks_as_eager_does() -> None:
    """Inductor has its own random generator; with it the adapters' dropout masks, so the training, would differ from
    the eager run's under the same seed. The compiled blocks ask inductor for torch's random ops (one tiny graph:
    inductor's C++ compile of a whole run is too slow for the suite)."""
    try:
        check_compile("inductor", torch.device("cpu"))
    except ConfigError as error:
        pytest.skip(str(error))
    from loracl.backbones.compiled import _compiled_forward

    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).train()
    block._compiled_call_impl = CompiledCall(block, _compiled_forward("inductor"))
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.manual_seed(0)
        compiled = block(x)
        eager_again(block)
        torch.manual_seed(0)
        assert torch.equal(compiled, block(x))
