"""The language task model: prompts, answer-only loss, truncation, generation, scoring, every method on a tiny
random Llama and T5, export to PEFT, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_interrupted_then_resumed, tiny_config

from loracl.backbones.language import LANGUAGE_MODELS
from loracl.cli import main
from loracl.config import TaskModelConfig
from loracl.data.stream import RawTask, build_stream
from loracl.engine import run_experiment
from loracl.errors import ConfigError, DataError
from loracl.methods.registry import available_methods, method_class
from loracl.task_models.language import IGNORE, LanguageTaskModel, normalise_answer, rouge_l

LM_METHODS = [name for name in available_methods() if "language" in method_class(name).task_models]


def instruction_stream(free_form: bool = True):
    """Two label tasks with instructions and (optionally) one free-form task: tiny, learnable by keyword."""
    tasks = [
        RawTask(
            "colour", ["red", "blue"], [("a ruby", "red"), ("the sea", "blue")] * 4, [("a ruby", "red"), ("the sea", "blue")], instruction="Name the colour."
        ),
        RawTask("size", ["big", "small"], [("an elephant", "big"), ("an ant", "small")] * 4, [("an elephant", "big"), ("an ant", "small")]),
    ]
    if free_form:
        tasks.append(RawTask("reverse", [], [("abc", "cba"), ("xy", "yx")] * 4, [("abc", "cba"), ("xy", "yx")], free_form=True))
    return build_stream(tasks)


def lm_config(method="seq_lora", backbone="tiny-llama", **sections):
    defaults = {"train": {"max_length": 192, "lr": 1e-2, "batch_size": 4}, "task_model": {"kind": "language"}}
    for key, value in sections.items():
        defaults[key] = {**defaults.get(key, {}), **value}
    return tiny_config(method, backbone, **defaults)


@pytest.fixture(scope="module")
def llama():
    return LanguageTaskModel(LANGUAGE_MODELS["tiny-llama"][0](192, 0)).eval()


@pytest.fixture(scope="module")
def t5():
    return LanguageTaskModel(LANGUAGE_MODELS["tiny-t5"][0](192, 0)).eval()


def test_training_batch_puts_the_loss_on_the_answer_and_eos_only(llama):
    stream = instruction_stream()
    task = stream.tasks[0]
    batch = llama.collate(task.train, [0, 1], task, train=True)
    tokenizer = llama.backbone.tokenizer
    for row in range(2):
        targets = batch["target_ids"][row]
        kept = targets[targets != IGNORE].tolist()
        assert kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept[:-1]) == task.train.targets[row]
        # the kept positions are exactly where the answer sits in the input ids
        positions = (targets != IGNORE).nonzero().squeeze(1)
        assert torch.equal(batch["input_ids"][row, positions], targets[positions])
        assert batch["prompt_mask"][row, positions].sum() == 0


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_answer_only_loss_equals_the_hugging_face_labels_loss(which, llama, t5, request):
    model = {"llama": llama, "t5": t5}[which]
    stream = instruction_stream()
    task = stream.tasks[1]
    inputs = model.collate(task.train, [0, 1, 2], task, train=True)
    batch = {"inputs": inputs}
    ours = model.loss(model(batch), batch, task, None)
    reference = model.backbone.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["target_ids"]).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_truncation_shortens_the_input_never_the_instruction_or_answer(llama):
    long = RawTask("long", ["yes", "no"], [("word " * 200, "yes")], [("word " * 200, "no")], instruction="Say yes or no.")
    task = build_stream([long]).tasks[0]
    batch = llama.collate(task.train, [0], task, train=True)
    tokenizer = llama.backbone.tokenizer
    prompt_length = int(batch["prompt_mask"][0].sum())
    assert prompt_length <= llama.backbone.max_length
    assert "Say yes or no." in tokenizer.decode(batch["input_ids"][0, :prompt_length])
    answer = batch["target_ids"][0][batch["target_ids"][0] != IGNORE].tolist()
    assert tokenizer.decode(answer[:-1]) == "yes"


def test_an_instruction_longer_than_max_length_is_a_data_error(llama):
    task = build_stream([RawTask("t", ["a", "b"], [("x", "a")], [("x", "b")], instruction="long " * 100)]).tasks[0]
    with pytest.raises(DataError, match="train.max_length"):
        llama.collate(task.train, [0], task, train=True)


def test_an_answer_longer_than_max_answer_tokens_is_a_data_error():
    model = LanguageTaskModel(LANGUAGE_MODELS["tiny-llama"][0](192, 0), TaskModelConfig(kind="language", max_answer_tokens=4))
    task = build_stream([RawTask("t", ["a"], [("x", "a much longer answer")], [("x", "a")], free_form=True)]).tasks[0]
    with pytest.raises(DataError, match="max_answer_tokens"):
        model.collate(task.train, [0], task, train=True)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_generation_is_greedy_and_left_padding_changes_no_answer(which, llama, t5):
    model = {"llama": llama, "t5": t5}[which]
    stream = instruction_stream()
    task = stream.tasks[0]
    batch = {"inputs": model.collate(task.test, [0, 1], task, train=False)}
    first, second = model.predict(batch), model.predict(batch)
    assert torch.equal(first, second)
    assert first.shape[1] <= model.options.max_new_tokens
    # each row decoded alone (no padding) gives the same answer as in the left-padded batch
    alone = [model.decode(model.predict({"inputs": model.collate(task.test, [i], task, train=False)}))[0] for i in range(2)]
    assert model.decode(first) == alone
    eos = model.backbone.tokenizer.eos_token_id
    assert model.decode(torch.tensor([[model.backbone.tokenizer.convert_tokens_to_ids("a"), eos, 7, 8]])) == ["a"]


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_generation_stops_each_row_at_its_end_of_sequence(which, llama, t5):
    """The model is made to emit <eos> as row 0's 2nd and every row's 4th answer token: row 0 then holds only
    padding, and decoding ends when every row has ended (not at max_new_tokens)."""
    model = {"llama": llama, "t5": t5}[which]
    task = instruction_stream().tasks[0]
    batch = {"inputs": model.collate(task.test, [0, 1], task, train=False)}
    tokenizer = model.backbone.tokenizer
    steps = []

    def force_eos(module, args, logits):  # logits [B, T, V]; one call per generated token (KV cache)
        step = len(steps)
        steps.append(step)
        rows = [0] if step == 1 else [0, 1] if step == 3 else []
        logits = logits.clone()
        logits[rows, -1, tokenizer.eos_token_id] = 1e4
        return logits

    handle = model.backbone.model.lm_head.register_forward_hook(force_eos)
    try:
        generated = model.predict(batch)
    finally:
        handle.remove()
    assert model.options.max_new_tokens > 4
    assert generated.shape[1] == 4
    assert generated[0, 1] == tokenizer.eos_token_id and (generated[0, 2:] == tokenizer.pad_token_id).all()
    assert generated[1, 3] == tokenizer.eos_token_id and tokenizer.eos_token_id not in generated[1, :3].tolist()
    kept = [generated[0, :1], generated[1, :3]]  # the tokens before each row's <eos>
    assert model.decode(generated) == [tokenizer.decode(row, skip_special_tokens=True) for row in kept]


def test_exact_match_normalises_case_and_whitespace_and_rouge_l_counts_overlap():
    assert normalise_answer("  Positive \n") == normalise_answer("positive")
    assert normalise_answer("New  York\tcity") == normalise_answer("new york city")
    assert normalise_answer("not positive") != normalise_answer("positive")
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("dog", "the cat sat") == 0.0
    assert rouge_l("the cat", "the cat sat") == pytest.approx(2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))


def test_rank_scoring_picks_the_most_likely_option_and_refuses_free_form():
    model = LanguageTaskModel(LANGUAGE_MODELS["tiny-llama"][0](192, 0), TaskModelConfig(kind="language", scoring="rank"))
    stream = instruction_stream()
    task = stream.tasks[0]
    inputs = model.collate(task.test, [0, 1], task, train=False)
    choice = model.predict({"inputs": inputs})[:, 0]
    # the chosen option's summed log-likelihood, computed one sequence at a time, is the highest
    for row in range(2):
        totals = []
        for option in task.options:
            prompt = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
            answer = model.answer_ids(option, "test")
            ids = torch.tensor([prompt + answer])
            logits = model.backbone.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            totals.append(float(logits.gather(1, torch.tensor(answer)[:, None]).sum()))
        assert int(choice[row]) == max(range(len(totals)), key=totals.__getitem__)
    with pytest.raises(ConfigError, match="free-form"):
        model.collate(stream.tasks[2].test, [0], stream.tasks[2], train=False)


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("method", LM_METHODS)
def test_every_method_trains_on_a_language_model_with_the_base_bit_identical(method, backbone):
    stream = instruction_stream()
    config = lm_config(method, backbone)
    from loracl.engine.runner import MethodRun

    run = MethodRun(config, config.method[0], stream, None)
    run.build()
    frozen = {name: tensor.clone() for name, tensor in run.model.backbone.model.state_dict().items()}
    [result] = run_experiment(config, None, stream=stream)
    model = result.method.model
    after = {name.replace(".base_layer", ""): tensor for name, tensor in model.backbone.model.state_dict().items()}
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), name
    matrix = result.results["accuracy_matrix"]
    assert len(matrix) == (1 if method_class(method).trains_jointly else 3) and len(matrix[-1]) == 3
    assert "rouge_l" in result.results["per_task"][-1]["metric_rows"]
    if method != "zero_shot":
        assert result.results["trainable_params_per_task"][-1] > 0


def test_training_teaches_the_answers_of_a_learnable_task():
    stream = instruction_stream(free_form=False)
    config = lm_config({"name": "seq_lora", "target_modules": "all-linear", "dropout": 0.0}, train={"epochs": 12, "lr": 1e-2, "batch_size": 2})
    [zero] = run_experiment(lm_config("zero_shot"), None, stream=stream)
    [trained] = run_experiment(config, None, stream=stream)
    # lr 1e-2 learns both tasks on seeds 0-4; 2e-2 overshoots on some data orders (0.5 with accelerate 1.16's)
    assert trained.results["accuracy_matrix"][0][0] == 1.0 > zero.results["accuracy_matrix"][0][0]
    assert trained.results["accuracy_matrix"][1][1] == 1.0 > zero.results["accuracy_matrix"][1][1]


def test_classifier_only_features_are_refused_on_a_language_model():
    stream = instruction_stream()
    with pytest.raises(ConfigError, match="needs a classifier head"):
        run_experiment(lm_config("probe"), None, stream=stream)
    with pytest.raises(ConfigError, match="only for a classifier"):
        run_experiment(lm_config("seq_lora", head={"type": "prototype"}), None, stream=stream)
    from helpers import tiny_text_stream

    with pytest.raises(ConfigError, match="zero-shot has no meaning"):
        run_experiment(tiny_config("zero_shot"), None, stream=tiny_text_stream(2))


def test_routed_inference_on_a_language_model_routes_to_tasks():
    stream = instruction_stream()
    [result] = run_experiment(lm_config({"name": "inc_lora", "routed_inference": True, "routed_branches": True}), None, stream=stream)
    # the three tasks' prompts differ in their instructions, so the prompt-feature router tells them apart
    assert result.results["method_metrics"]["routing_accuracy_per_task"] == {"colour": 1.0, "size": 1.0, "reverse": 1.0}


def test_a_classifier_head_over_a_language_models_features():
    from helpers import tiny_text_stream

    [result] = run_experiment(tiny_config("seq_lora", "tiny-llama", task_model={"kind": "classifier"}), None, stream=tiny_text_stream(2))
    model = result.method.model
    assert type(model).__name__ == "ClassifierTaskModel"
    # one 2-class block per task over the decoder's hidden states
    assert [tuple(weight.shape) for weight in model.head.weights] == [(2, model.backbone.model.config.hidden_size)] * 2
    assert len(result.results["accuracy_matrix"]) == 2


def test_killed_run_resumes_equal_to_an_uninterrupted_one(tmp_path, monkeypatch):
    stream = instruction_stream()
    config = lm_config("o_lora")
    [straight] = run_experiment(config, tmp_path / "straight", stream=stream)
    resumed = run_interrupted_then_resumed(config, tmp_path / "resumed", stream, monkeypatch, crash_at=2)
    assert resumed.results["accuracy_matrix"] == straight.results["accuracy_matrix"]


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-t5"])
def test_export_loads_in_peft_and_generates_the_same_tokens(tmp_path, backbone):
    from peft import PeftModel

    stream = instruction_stream()
    config = lm_config("seq_lora", backbone=backbone, train={"epochs": 3})
    [result] = run_experiment(config, tmp_path / "run", stream=stream)
    assert main(["export", str(tmp_path / "run" / "seq_lora"), "--out", str(tmp_path / "adapter")]) == 0
    model = result.method.model
    task = stream.tasks[0]
    inputs = model.collate(task.test, [0, 1], task, train=False)
    ours = model.predict({"inputs": inputs})
    fresh = LANGUAGE_MODELS[backbone][0](192, 0)
    peft_model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter")).eval()
    prompt = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    theirs = peft_model.generate(
        **prompt,
        do_sample=False,
        max_new_tokens=model.options.max_new_tokens,
        pad_token_id=fresh.tokenizer.pad_token_id,
        eos_token_id=fresh.tokenizer.eos_token_id,
    )
    # a causal model returns prompt + answer, an encoder-decoder its start token + answer
    theirs = theirs[:, 1:] if fresh.is_encoder_decoder else theirs[:, prompt["input_ids"].shape[1] :]
    assert torch.equal(ours, theirs)
    # the same next-token logits, and not the base model's: the exported adapter is what was trained
    if fresh.is_encoder_decoder:
        prompt["decoder_input_ids"] = torch.full((2, 1), fresh.model.config.decoder_start_token_id)
    with torch.no_grad():
        served = model.backbone.model(**prompt).logits
        exported = peft_model(**prompt).logits
        with peft_model.disable_adapter():
            base = peft_model(**prompt).logits
    assert torch.allclose(exported, served, atol=1e-5, rtol=0), (exported - served).abs().max()
    assert (exported - base).abs().max() > 1e-3


def write_task(root: Path, name: str, labels, train, test, instruction: bytes | None = None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))
    if instruction is not None:
        (folder / "instruction.txt").write_bytes(instruction)


def test_instruction_txt_and_free_form_folders_are_read(tmp_path):
    from loracl.data.sources.json_dir import load_json_dir

    write_task(tmp_path, "a", ["yes", "no"], [{"sentence": "x", "label": "yes"}], [{"sentence": "y", "label": "no"}], b"Answer yes or no.\n")
    write_task(tmp_path, "b", None, [{"input": "abc", "output": "cba"}], [{"input": "xy", "output": "yx"}])
    stream = build_stream(load_json_dir(tmp_path))
    first, second = stream.tasks
    assert first.train.headers[0] == "Answer yes or no.\nOptions: yes, no" and first.train.targets == ["yes"]
    assert second.free_form and second.test.targets == ["yx"] and second.class_ids == []


BAD_INPUTS = {
    "empty label": ("labels", ["yes", ""], "a label is empty"),
    "long answer": ("free_form", "x" * 200, "max_answer_tokens"),
    "binary instruction": ("instruction", b"\xff\xfe\x00bad", "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_exits_2_naming_the_culprit_and_writes_nothing(case, tmp_path, capsys):
    kind, value, message = BAD_INPUTS[case]
    data = tmp_path / "data"
    if kind == "labels":
        write_task(data, "t", value, [{"sentence": "x", "label": "yes"}], [{"sentence": "y", "label": "yes"}])
    elif kind == "free_form":
        write_task(data, "t", None, [{"input": "x", "output": value}], [{"input": "y", "output": "z"}])
    else:
        write_task(data, "t", ["yes", "no"], [{"sentence": "x", "label": "yes"}], [{"sentence": "y", "label": "no"}], value)
    config = tmp_path / "config.yaml"
    config.write_text(
        "backbone: {name: tiny-llama}\ntask_model: {kind: language}\n"
        f"stream: {{source: json_dir, path: {data}}}\ntrain: {{max_length: 192, progress: false}}\nmethod: [{{name: seq_lora}}]\n"
    )
    out = tmp_path / "out"
    # in process (tests/test_cli_and_resume.py runs the real entry point once): the same handler, no interpreter start
    code, err = main(["run", str(config), "--out", str(out)]), capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("backbone", "task_model", "message"),
    [
        ("/nowhere/model.gguf", "language", "GGUF file not found"),
        ("no-such-model-anywhere", "auto", "no-such-model-anywhere"),
        ("tiny-t5", "language', chat_template: 'on", "no chat template"),
    ],
)
def test_bad_model_settings_exit_2_with_one_line(backbone, task_model, message, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"backbone: {{name: '{backbone}'}}\ntask_model: {{kind: '{task_model}'}}\ntrain: {{max_length: 192, progress: false}}\nmethod: [{{name: seq_lora}}]\n"
    )
    code, err = main(["run", str(config), "--out", str(tmp_path / "out")]), capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_packaged_instruction_stream_has_instructions_and_runs_on_a_tiny_model():
    from loracl.config import load_config
    from loracl.data.build import load_stream

    root = Path(__file__).resolve().parent.parent
    config = load_config(
        root / "configs" / "instruct_quickstart.yaml", ["backbone.name=tiny-llama", "stream.max_train_per_task=4", "stream.max_test_per_task=2"]
    )
    stream = load_stream(config.stream, 0)
    assert [task.name for task in stream.tasks] == ["sst2", "qqp", "cb"]
    assert stream.tasks[0].train.headers[0].startswith("Is the sentiment of this movie review Good or Bad?")
    config = load_config(
        root / "configs" / "instruct_quickstart.yaml",
        ["backbone.name=tiny-llama", "stream.max_train_per_task=4", "stream.max_test_per_task=2", "train.max_length=512"],
    )
    results = run_experiment(config, None)
    assert [result.label for result in results] == ["zero_shot", "seq_lora", "o_lora"]


def test_seq_lora_trains_bit_for_bit_like_a_peft_loop():
    """Two tasks of loracl's seq_lora against get_peft_model + `model(**batch, labels=...)` + AdamW on the same
    batches and start weights: the trained LoRA factors are identical."""
    import copy

    from peft import LoraConfig, get_peft_model

    from loracl.engine.runner import MethodRun
    from loracl.seeding import derived_seed

    stream = instruction_stream(free_form=False)
    config = lm_config({"name": "seq_lora", "target_modules": ["q_proj", "v_proj"]}, train={"lr": 1e-2})
    [ours] = run_experiment(config, None, stream=stream)
    run = MethodRun(config, config.method[0], stream, None)
    method = run.build()
    method.attach(copy.deepcopy(run.model))
    method.begin_task(stream.tasks[0])
    start = {name: layer.branches["default"] for name, layer in method.layers.items()}
    options = method.options
    peft_model = get_peft_model(
        run.model.backbone.model,
        LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=["q_proj", "v_proj"]),
    )
    lora = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    with torch.no_grad():
        for name, module in lora.items():
            module.lora_A["default"].weight.copy_(start[name].lora_A)
            module.lora_B["default"].weight.copy_(start[name].lora_B)
    for task in stream.tasks:
        torch.manual_seed(derived_seed(config.seed, task.index))
        parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=0.0)
        peft_model.train()
        for batch in run.loader(task.train, task, train=True):
            inputs = batch["inputs"]
            peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["target_ids"]).loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for name, layer in ours.method.layers.items():
        assert torch.allclose(layer.branches["default"].lora_B, lora[name].lora_B["default"].weight, atol=1e-6), name
        assert torch.allclose(layer.branches["default"].lora_A, lora[name].lora_A["default"].weight, atol=1e-6), name
    assert any(layer.branches["default"].lora_B.abs().sum() > 0 for layer in ours.method.layers.values())


def test_rank_scoring_sees_fm_loras_input_prompt():
    """An input prompt changes the ranked log-likelihoods exactly as it changes generation's inputs."""
    config = lm_config("fm_lora", task_model={"kind": "language", "scoring": "rank"})
    stream = instruction_stream(free_form=False)
    [result] = run_experiment(config, None, stream=stream)
    model = result.method.model
    prompt = model.backbone.input_prompts[0]
    task = stream.tasks[0]
    inputs = model.collate(task.test, [0, 1], task, train=False)
    with torch.no_grad():
        prompt.prompts.mul_(50.0)  # a prompt that matters
        with_prompt = model.option_log_likelihoods(inputs)
        prompt.active = False
        without_prompt = model.option_log_likelihoods(inputs)
        prompt.active = True
    assert with_prompt.shape == without_prompt.shape == (2, len(task.options))
    assert not torch.allclose(with_prompt, without_prompt)


def test_a_local_folder_of_a_causal_lm_loads_as_a_language_model(tmp_path):
    from loracl.backbones.language import LanguageBackbone
    from loracl.backbones.registry import load_backbone

    tiny = LANGUAGE_MODELS["tiny-llama"][0](64, 0)
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_backbone(str(tmp_path / "model"), max_length=64)  # task_model.kind auto: its config generates text
    assert isinstance(loaded, LanguageBackbone) and not loaded.is_encoder_decoder
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded.model(input_ids=ids).logits, tiny.model.eval()(input_ids=ids).logits)
    assert all(not parameter.requires_grad for parameter in loaded.model.parameters())


def test_a_damaged_gguf_file_is_one_clear_error(tmp_path):
    from loracl.backbones.registry import load_backbone
    from loracl.errors import LoraclError

    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(LoraclError, match="broken.gguf"):
        load_backbone(str(path))
