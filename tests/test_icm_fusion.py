"""ICM-Fusion invariants (spec section 9): flat codec, F-VAE shapes, KL, fusion rule, meta loss, frozen backbone, stream."""

import pytest
import torch
from helpers import tiny_config, tiny_text_stream

from loracl.adapters.peft_io import LoraPair
from loracl.backbones.registry import load_backbone
from loracl.config import validate_config
from loracl.engine import run_experiment
from loracl.errors import ConfigError, LoraclError
from loracl.fusion import LoraHost, TaskAdapter, TaskSupport, fuse
from loracl.fusion.flat import FlatLayout, flatten, full_rank_view, tensor_stats, truncated_lora, unflatten
from loracl.fusion.icm_fusion import FusionTask, IcmFusion, IcmFusionOptions
from loracl.fusion.vae import FusionVAE, cvae_loss, kl_divergence

MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
           "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
QUICK = {"warm_start_steps": 2, "meta_steps": 1, "batch_size": 2, "meta_batch_size": 2, "inner_steps": 1, "latent_dim": 8, "channel_divisor": 8}


def random_adapter(seed, rank=4):
    generator = torch.Generator().manual_seed(seed)
    return {m: LoraPair(torch.randn(rank, 32, generator=generator) * 0.2, torch.randn(32, rank, generator=generator) * 0.2, 2.0) for m in MODULES}


def test_flatten_unflatten_round_trip_and_length_bookkeeping():
    adapter = random_adapter(0)
    layout = FlatLayout.of(adapter)
    assert layout.numel == sum(p.lora_A.numel() + p.lora_B.numel() for p in adapter.values())
    assert layout.padded % 4096 == 0 and layout.padded - 4096 < layout.numel <= layout.padded
    flat, stats = flatten(layout, adapter)
    assert flat.shape == (layout.padded,) and torch.count_nonzero(flat[layout.numel :]) == 0
    for module, pair in unflatten(layout, flat, stats).items():
        assert torch.allclose(pair.lora_A, adapter[module].lora_A, atol=1e-6)
        assert torch.allclose(pair.lora_B, adapter[module].lora_B, atol=1e-6)
    shared = tensor_stats(layout, [adapter, random_adapter(1)])
    restored = unflatten(layout, flatten(layout, adapter, shared)[0], shared)
    assert all(torch.allclose(restored[m].lora_B, adapter[m].lora_B, atol=1e-5) for m in MODULES)


def test_centring_offset_round_trips_and_removes_what_every_lora_shares():
    """centre: the pooled mean vector comes off after z-scoring and back on after decoding; a factor every task
    shares (the same-seed A) is zero in the centred data the F-VAE sees."""
    shared_down = random_adapter(0)
    adapters = []
    for seed in range(3):
        ups = random_adapter(20 + seed)
        adapters.append({m: LoraPair(shared_down[m].lora_A, ups[m].lora_B, 2.0) for m in MODULES})
    tasks = [
        FusionTask(f"t{i}", adapter, TaskSupport({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, torch.zeros(1, dtype=torch.long), torch.nn.Identity()))
        for i, adapter in enumerate(adapters)
    ]
    fusion = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=0, centre=True), host=None)
    layout = FlatLayout.of(adapters[0])
    per_task, finals, stats, _ = fusion.weight_data(tasks, layout)
    assert stats.offset is not None and stats.offset.shape == (layout.padded,)
    flats = torch.stack(finals)
    torch.testing.assert_close(flats.mean(0), torch.zeros(layout.padded), atol=1e-5, rtol=0)
    a_size = shared_down[MODULES[0]].lora_A.numel()
    assert flats[:, :a_size].abs().max() < 1e-5  # the first module's shared A is gone
    for adapter, flat in zip(adapters, finals):
        restored = unflatten(layout, flat, stats)
        assert all(torch.allclose(restored[m].lora_B, adapter[m].lora_B, atol=1e-5) for m in MODULES)
    with pytest.raises(ValueError, match="centre"):
        IcmFusionOptions(centre=True, normalisation="per_sample")


def test_vae_shapes_and_eval_determinism():
    vae = FusionVAE(4096, condition_dim=5, latent_dim=8).eval()
    flat, condition = torch.randn(1, 4096), torch.randn(1, 5)
    mean, logvar = vae.encode(flat, condition)
    assert mean.shape == logvar.shape == (1, 8)
    assert vae.encoder(flat.unsqueeze(1)).shape == (1, 8, 1)  # 8 channels x L_last
    first, second = vae.decode(mean, condition), vae.decode(mean, condition)
    assert first.shape == (1, 4096) and torch.equal(first, second)
    with pytest.raises(LoraclError, match="multiple of 4096"):
        FusionVAE(5000, 5)


def test_kl_matches_torch_distributions_and_vanishes_at_the_prior():
    mean, logvar = torch.randn(3, 6), torch.randn(3, 6)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros(3, 6), torch.ones(3, 6))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1).mean()
    assert torch.allclose(kl_divergence(mean, logvar), expected, atol=1e-5)
    assert kl_divergence(torch.zeros(2, 6), torch.zeros(2, 6)) == 0


def test_fusion_rule_single_task_and_permutation_invariance():
    icm = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=0), None)
    vae = FusionVAE(4096, 5, 8).eval()
    latents, vectors = torch.randn(2, 8), torch.randn(2, 5)
    with torch.no_grad():
        single = icm.decode_fused(vae, latents[:1], vectors[:1], torch.ones(1))
        assert torch.equal(single, vae.decode(latents[:1], vectors[:1])[0])  # T = 1: z_f = z_1, v_f = v_1
        uniform = torch.full((2,), 0.5)
        forward = icm.decode_fused(vae, latents, vectors, uniform)
        backward = icm.decode_fused(vae, latents.flip(0), vectors.flip(0), uniform)
    assert torch.allclose(forward, backward, atol=1e-6)


def test_meta_loss_with_zero_inner_steps_is_the_plain_cvae_loss():
    icm = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=0), None)
    vae = FusionVAE(4096, 5, 8)
    targets, conditions = torch.randn(2, 4096), torch.randn(2, 5)
    torch.manual_seed(3)
    meta = icm.meta_loss(vae, targets, conditions, [], None, None)
    torch.manual_seed(3)
    reconstruction, mean, logvar = vae(targets, conditions)
    assert torch.allclose(meta, cvae_loss(targets, reconstruction, mean, logvar, 0.005))


def test_icm_fusion_end_to_end_keeps_the_backbone_frozen_and_is_peft_shaped():
    backbone = load_backbone("tiny-bert", seed=0)
    before = {name: tensor.clone() for name, tensor in backbone.model.state_dict().items()}
    host = LoraHost(backbone, MODULES)
    adapters = [TaskAdapter(f"t{seed}", random_adapter(seed)) for seed in range(2)]
    inputs = backbone.collate(["abc de", "fgh", "ijk lm"])
    head = torch.nn.Linear(32, 2)
    supports = [TaskSupport(inputs, torch.tensor([0, 1, 0]), head) for _ in adapters]
    outcome = fuse(adapters, "icm", {"icm": QUICK}, host=host, supports=supports, samples=[[random_adapter(10 + seed)] for seed in range(2)])
    assert set(outcome.adapter) == set(MODULES)
    assert all(outcome.adapter[m].lora_A.shape == (4, 32) for m in MODULES)
    assert outcome.report["weight_samples_per_task"] == [5, 5]  # 2 real + noise augmentation to min_samples
    after = backbone.model.state_dict()
    for name, tensor in before.items():
        key = name if name in after else name.replace(".query.", ".query.base_layer.").replace(".value.", ".value.base_layer.")
        assert torch.equal(after[key], tensor), name
    with pytest.raises(LoraclError, match="data-free mode"):
        fuse(adapters, "icm", {"icm": QUICK})


@pytest.mark.parametrize("normalisation", ["shared", "per_sample"])
def test_round_trip_adapters_decode_each_task_under_its_own_condition(normalisation):
    """decoded_task_adapters: one adapter per task, D(z_i, v_i) de-normalised with the statistics task i was
    encoded with (its own under per_sample); the fused one is D(mean z, mean v) with the fusion statistics."""
    adapters = [TaskAdapter(f"t{seed}", random_adapter(seed)) for seed in range(3)]
    options = {"icm": {**QUICK, "task_vector": "parameters", "inner_steps": 0, "normalisation": normalisation}}
    outcome = fuse(adapters, "icm", options, samples=[[random_adapter(10 + seed)] for seed in range(3)])
    result = outcome.icm
    assert result is not None and fuse(adapters, "linear").icm is None
    decoded = result.decoded_task_adapters()
    assert len(decoded) == 3
    with torch.no_grad():
        expected = result.vae.decode(result.latents[1:2], result.task_vectors[1:2])[0]
        fused = result.vae.decode(result.latents.mean(0, keepdim=True), result.task_vectors.mean(0, keepdim=True))[0]
    expected_adapter = unflatten(result.layout, expected, result.task_stats[1])
    fused_adapter = unflatten(result.layout, fused, result.stats)
    own = tensor_stats(result.layout, [adapters[1].pairs])
    assert torch.equal(result.task_stats[1].mean, own.mean if normalisation == "per_sample" else result.stats.mean)
    for module in MODULES:
        assert torch.allclose(decoded[1][module].lora_B, expected_adapter[module].lora_B)
        assert decoded[1][module].lora_A.shape == adapters[1].pairs[module].lora_A.shape
        assert torch.allclose(outcome.adapter[module].lora_A, fused_adapter[module].lora_A, atol=1e-6)


def test_a_head_on_another_device_than_the_base_model_is_named():
    # the meta device stands in for a GPU: a support head left elsewhere is one clear error, not a device trace
    backbone = load_backbone("tiny-bert", seed=0)
    host = LoraHost(backbone, MODULES)
    support = TaskSupport(backbone.collate(["abc de", "fgh"]), torch.tensor([0, 1]), torch.nn.Linear(32, 2).to("meta"))
    with pytest.raises(LoraclError, match="head is on meta"):
        host.loss_and_grads(random_adapter(0), support)


def test_seeded_blocks_leave_the_callers_random_stream_untouched():
    from loracl.seeding import seeded_rng

    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with seeded_rng(5):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded_rng(5):
        assert torch.equal(torch.rand(3), inside)


@pytest.mark.parametrize("mode, target", [("online", "factors"), ("end", "factors"), ("online", "delta"), ("continue", "delta")])
def test_icm_fusion_method_runs_a_tiny_stream(tmp_path, mode, target):
    method = {
        "name": "icm_fusion",
        "rank": 2,
        "mode": mode,
        "harvest_checkpoints": 2,
        "support_per_task": 4,
        "fusion": {**QUICK, "latent_dim": 4, "target": target},
    }
    config = tiny_config(method, train={"batch_size": 4})
    results = run_experiment(config, tmp_path / mode, stream=tiny_text_stream(3, train=12, test=6))[0].results
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 3 and all(cell is not None for cell in matrix[-1])
    assert results["method_metrics"]["mode"] == mode and "vae_params" in results["method_metrics"]
    from loracl.fusion import read_run_branch

    branch = read_run_branch(tmp_path / mode / "icm_fusion", 1)  # what `loracl fuse --run` reads
    assert all(pair.lora_A.shape[0] == 2 for pair in branch.pairs.values())


def test_icm_fusion_method_rejects_bad_options():
    from loracl.config import validate_config

    with pytest.raises(LoraclError, match="mode"):
        validate_config({"method": {"name": "icm_fusion", "mode": "sometimes"}})
    with pytest.raises(LoraclError, match="fusion.kl_weight"):
        validate_config({"method": {"name": "icm_fusion", "fusion": {"kl_weight": -1}}})


def test_centre_enters_the_run_fingerprint_only_when_on():
    """Runs written before `centre` existed keep their fingerprint (and resume); turning it on changes it."""
    from loracl.methods.icm_fusion import IcmFusionMethodOptions

    plain = IcmFusionMethodOptions().fingerprint_dump()
    assert "centre" not in plain["fusion"] and plain["fusion"]["kl_weight"] == 0.005
    centred = IcmFusionMethodOptions(fusion={"centre": True}).fingerprint_dump()
    assert centred["fusion"]["centre"] is True and centred != plain


def test_delta_target_views_round_trip_and_cut_to_rank_r():
    adapter = random_adapter(0)
    view = full_rank_view(adapter)
    layout = FlatLayout.of(view, identity_down=True)
    assert [part for _, part in layout.keys] == ["B"] * len(MODULES)
    assert layout.numel == sum(32 * 32 for _ in MODULES)
    flat, stats = flatten(layout, view)
    restored = unflatten(layout, flat, stats)
    for module, pair in adapter.items():
        delta = pair.scaling * pair.lora_B @ pair.lora_A
        assert torch.equal(restored[module].lora_A, torch.eye(32))
        assert torch.allclose(restored[module].lora_B, delta, atol=1e-5)
    cut = truncated_lora({m: p.lora_B for m, p in restored.items()}, {m: 4 for m in MODULES}, {m: 2.0 for m in MODULES})
    for module, pair in adapter.items():
        assert cut[module].lora_A.shape == (4, 32) and cut[module].lora_B.shape == (32, 4) and cut[module].scaling == 2.0
        assert torch.allclose(cut[module].scaling * cut[module].lora_B @ cut[module].lora_A, pair.scaling * pair.lora_B @ pair.lora_A, atol=1e-4)
    sum_of_two = {m: LoraPair(torch.eye(32), view[m].lora_B + full_rank_view(random_adapter(1))[m].lora_B, 1.0) for m in MODULES}
    best = truncated_lora({m: p.lora_B for m, p in sum_of_two.items()}, {m: 4 for m in MODULES}, {m: 2.0 for m in MODULES})[MODULES[0]]
    singular = torch.linalg.svdvals(sum_of_two[MODULES[0]].lora_B.double())
    error = (2.0 * best.lora_B.double() @ best.lora_A.double() - sum_of_two[MODULES[0]].lora_B.double()).norm()
    assert error == pytest.approx(float(singular[4:].norm()), rel=1e-4)  # Eckart-Young: the best rank-4 cut
    conv = {"conv": LoraPair(torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1), 1.0)}
    with pytest.raises(LoraclError, match="Linear LoRAs only"):
        full_rank_view(conv)


def test_a_full_rank_view_runs_like_its_lora_and_its_gradient_is_the_delta_gradient():
    backbone = load_backbone("tiny-bert", seed=0)
    host = LoraHost(backbone, MODULES)
    adapter = random_adapter(3)
    inputs = backbone.collate(["abc de", "fgh"])
    support = TaskSupport(inputs, torch.tensor([0, 1]), torch.nn.Linear(32, 2))
    host.set_adapter(adapter)
    expected = host.features(inputs)
    host.set_adapter(full_rank_view(adapter))
    assert torch.allclose(host.features(inputs), expected, atol=1e-5)
    _, factor_grads = host.loss_and_grads(adapter, support)
    _, view_grads = host.loss_and_grads(full_rank_view(adapter), support)
    for module, pair in adapter.items():  # dL/dA = s B^T G with G = dL/d(dW), the view's B gradient
        assert torch.allclose(factor_grads[module].lora_A, pair.scaling * pair.lora_B.T @ view_grads[module].lora_B, atol=1e-6)


@pytest.mark.parametrize("delta_rank", [None, 2])
def test_icm_fusion_with_the_delta_target_returns_rank_r_loras(delta_rank):
    backbone = load_backbone("tiny-bert", seed=0)
    host = LoraHost(backbone, MODULES)
    adapters = [TaskAdapter(f"t{seed}", random_adapter(seed)) for seed in range(2)]
    supports = [TaskSupport(backbone.collate(["abc de", "fgh"]), torch.tensor([0, 1]), torch.nn.Linear(32, 2)) for _ in adapters]
    icm = {**QUICK, "target": "delta", "delta_rank": delta_rank}
    outcome = fuse(adapters, "icm", {"icm": icm}, host=host, supports=supports)
    rank = delta_rank or 4
    assert outcome.report["target"] == "delta" and outcome.report["fused_rank"] == rank
    assert outcome.report["lora_params"] == len(MODULES) * 32 * 32
    decoded = outcome.icm.decoded_task_adapters()
    for adapter in [outcome.adapter, *decoded]:
        assert all(adapter[m].lora_A.shape == (rank, 32) and adapter[m].scaling == 2.0 for m in MODULES)
        assert all(adapter[m].lora_A.device.type == "cpu" for m in MODULES)


def test_alignment_term_adds_exactly_its_latent_distance():
    backbone = load_backbone("tiny-bert", seed=0)
    host = LoraHost(backbone, MODULES)
    adapter = random_adapter(0)
    layout = FlatLayout.of(adapter)
    flat, stats = flatten(layout, adapter)
    support = TaskSupport(backbone.collate(["abc de", "fgh"]), torch.tensor([0, 1]), torch.nn.Linear(32, 2))
    vae = FusionVAE(layout.padded, 3, 8, channel_divisor=8)
    targets, conditions = torch.stack([flat, flat]), torch.randn(2, 3)
    losses = {}
    for weight in (0.0, 0.5):
        icm = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=1, inner_lr=0.5, align_weight=weight), host)
        torch.manual_seed(4)
        losses[weight] = icm.meta_loss(vae, targets, conditions, [support, support], layout, stats)
    torch.manual_seed(4)
    with torch.no_grad():
        initial = vae.decode(vae.sample(*vae.encode(targets, conditions)), conditions)
    adapted = torch.stack([icm.in_context_adapt(row, support, layout, stats, 1) for row in initial])
    adapted[:, layout.numel :] = 0.0
    with torch.no_grad():
        distance = (vae.encode(targets, conditions)[0] - vae.encode(adapted, conditions)[0]).pow(2).sum(1).mean()
    assert float(distance) > 0
    assert float((losses[0.5] - losses[0.0]).detach()) == pytest.approx(0.5 * float(distance), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(
    "options, culprit",
    [({"delta_rank": 2}, "delta_rank"), ({"align_weight": 0.1, "inner_steps": 0}, "align_weight"), ({"target": "weights"}, "target")],
)
def test_delta_and_alignment_options_are_checked(options, culprit):
    with pytest.raises(ValueError, match=culprit):
        IcmFusionOptions(**options)


def test_delta_rank_limits_are_named():
    view = full_rank_view(random_adapter(0))
    with pytest.raises(LoraclError, match="delta_rank 40 exceeds"):
        truncated_lora({m: p.lora_B for m, p in view.items()}, {m: 40 for m in MODULES}, {m: 2.0 for m in MODULES})
    with pytest.raises(LoraclError, match="scaling of 0"):
        truncated_lora({m: p.lora_B for m, p in view.items()}, {m: 4 for m in MODULES}, {m: 0.0 for m in MODULES})
    with pytest.raises(ConfigError, match="delta_rank"):  # the stream writes fused LoRAs into rank-r branches
        validate_config({"backbone": {"name": "tiny-bert"}, "method": [{"name": "icm_fusion", "rank": 4, "fusion": {"target": "delta", "delta_rank": 2}}]})
    identities = {}
    first, second = full_rank_view(random_adapter(0), identities), full_rank_view(random_adapter(1), identities)
    assert first[MODULES[0]].lora_A is second[MODULES[1]].lora_A  # one identity shared by every view


def test_icm_fusing_one_adapter_returns_close_to_itself():
    """Spec invariant: with one task the fused LoRA is the F-VAE's reconstruction of that task's LoRA. A short,
    fast schedule (60 warm-start steps) already lands within 30 % of dW (1.0 = the zero update)."""
    from loracl.fusion.adapters import delta_weights

    generator = torch.Generator().manual_seed(0)
    modules = ["a.q", "a.v", "b.q", "b.v"]
    adapter = {name: LoraPair(torch.randn(4, 32, generator=generator) * 0.2, torch.randn(32, 4, generator=generator) * 0.2, 2.0) for name in modules}
    options = {"icm": {"task_vector": "parameters", "inner_steps": 0, "meta_steps": 0, "warm_start_steps": 60, "batch_size": 4, "outer_lr": 1e-2}}
    fused = fuse([TaskAdapter("t", adapter)], "icm", options).adapter
    own, out = delta_weights(adapter), delta_weights(fused)
    error = sum(float((out[name] - own[name]).norm() ** 2) for name in modules) ** 0.5
    scale = sum(float(own[name].norm() ** 2) for name in modules) ** 0.5
    assert error / scale < 0.3


def test_icm_report_storage_accounting():
    """Spec invariant 11 on a case counted by hand: storage = |F-VAE| + T d_v + 2 (#LoRA tensors) + N (+ N for the
    centring offset). Three modules, rank 2, A [2, 16], B [24, 2]: N = 3 * (32 + 48) = 240, 6 tensors -> 12 stats,
    d_v = 3 * (1 + 2) = 9 per task, T = 2 -> 18. F-VAE with every conv one channel wide (channel_divisor 256),
    d_z = 2, L_last = 4096 / 4096 = 1: encoder 12 x (conv 7 + 1, BN 2) = 120; to_hidden 1 -> 2: 4;
    to_mean and to_logvar (2 + 9) -> 2: 24 each; from_latent (2 + 9) -> 1: 12; decoder 11 x (conv-T 8 + BN 2)
    + conv-T 8 + BN 2 + conv 8 = 128; in all 312."""
    generator = torch.Generator().manual_seed(1)
    modules = ["a.q", "a.v", "b.q"]

    def adapter():
        return {name: LoraPair(torch.randn(2, 16, generator=generator), torch.randn(24, 2, generator=generator), 1.0) for name in modules}

    adapters = [TaskAdapter("x", adapter()), TaskAdapter("y", adapter())]
    icm = {"task_vector": "parameters", "inner_steps": 0, "meta_steps": 0, "warm_start_steps": 1, "channel_divisor": 256, "latent_dim": 2}
    report = fuse(adapters, "icm", {"icm": icm}).report
    assert (report["vae_params"], report["task_vector_dim"], report["lora_params"]) == (312, 9, 240)
    assert report["storage_floats"] == 312 + 18 + 12 + 240
    centred = fuse(adapters, "icm", {"icm": {**icm, "centre": True}}).report
    assert centred["storage_floats"] == 312 + 18 + 12 + 240 + 240  # the offset: one value per LoRA position


class _IdentityVAE(torch.nn.Module):
    """Stands in for the F-VAE: a flat vector encodes to itself with (practically) zero variance and a latent decodes
    to itself, so the in-context steps start from exactly the weight sample that was drawn."""

    def __init__(self, length, condition_dim, latent_dim=256, channel_divisor=1):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def encode(self, flat, condition):
        return flat * self.gain, torch.full_like(flat, -100.0)

    def decode(self, latent, condition):
        return latent

    sample = staticmethod(FusionVAE.sample)


class _RecordingHost:
    """A host that records every LoRA it is asked for a task gradient of, and answers a constant gradient (zero
    unless `fill` is given)."""

    device = torch.device("cpu")

    def __init__(self, fill=0.0):
        self.seen, self.fill = [], fill

    def loss_and_grads(self, adapter, support):
        self.seen.append(adapter)
        return 0.0, {m: LoraPair(torch.full_like(p.lora_A, self.fill), torch.full_like(p.lora_B, self.fill), 1.0) for m, p in adapter.items()}


def test_per_sample_in_context_steps_take_the_gradient_on_the_lora_the_sample_stands_for(monkeypatch):
    """per_sample: a weight sample is z-scored with its own statistics, so the in-context steps must de-normalise it
    with those too; with the averaged statistics the task gradient was taken on another LoRA than the decoded one."""
    import loracl.fusion.icm_fusion as icm_module

    def scaled(seed, scale, shift):
        return {m: LoraPair(p.lora_A * scale + shift, p.lora_B * scale - shift, 2.0) for m, p in random_adapter(seed).items()}

    support = TaskSupport({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, torch.zeros(1, dtype=torch.long), torch.nn.Identity())
    tasks = [
        FusionTask("small", scaled(0, 1.0, 0.0), support, [scaled(1, 0.5, 0.1)]),
        FusionTask("large", scaled(2, 4.0, 1.0), support, [scaled(3, 3.0, -0.5)]),
    ]
    real = [adapter for task in tasks for adapter in [task.final, *task.samples]]
    options = IcmFusionOptions(
        task_vector="parameters", normalisation="per_sample", warm_start_steps=0, meta_steps=4, meta_batch_size=2,
        inner_steps=1, min_samples=1, kl_weight=0.0,
    )
    host = _RecordingHost()
    monkeypatch.setattr(icm_module, "FusionVAE", _IdentityVAE)
    IcmFusion(options, host).fuse(tasks)
    assert len(host.seen) == 4 * 2  # one in-context step per drawn row

    def same(first, second):
        return all(
            torch.allclose(first[m].lora_A, second[m].lora_A, atol=1e-4) and torch.allclose(first[m].lora_B, second[m].lora_B, atol=1e-4)
            for m in MODULES
        )

    for adapter in host.seen:
        assert any(same(adapter, lora) for lora in real), "the in-context step ran on a LoRA that is no weight sample"
    # a jittered row (fewer samples than min_samples) carries its source row's statistics
    jittery = IcmFusion(options.model_copy(update={"min_samples": 4, "noise_std": 0.01}), host)
    per_task, _, _, row_stats = jittery.weight_data(tasks, FlatLayout.of(tasks[0].final))
    for stack, stats in zip(per_task, row_stats):
        assert len(stats) == len(stack) == 4 and stats[2] is stats[0] and stats[3] is stats[1]


def test_parameter_task_vectors_of_a_conv_lora_by_hand():
    """task_vector parameters on a conv LoRA (lora_A [r, c_in, kh, kw], lora_B [c_out, r, 1, 1]): dW is the matrix
    [c_out, c_in kh kw]. Here r = 1, c_in = 1, 2 x 2 kernel, c_out = 2, s = 0.5: dW = 0.5 [[1, 2, 3, 4], [-1, -2, -3, -4]],
    mean |dW| = 0.5 * 2.5 and its one singular value 0.5 * sqrt(2) * sqrt(30)."""
    from loracl.fusion.adapters import delta_weights
    from loracl.fusion.icm_fusion import parameter_task_vector

    pair = LoraPair(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2), torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1), 0.5)
    vector = parameter_task_vector({"conv": pair})
    torch.testing.assert_close(vector, torch.tensor([1.25, 0.5 * 60**0.5]))
    expected = 0.5 * torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]])
    torch.testing.assert_close(delta_weights({"conv": pair})["conv"], expected)


def test_icm_fusion_of_conv_loras_with_parameter_task_vectors_on_the_tiny_vit():
    """Fusing the tiny ViT's patch-embedding conv LoRAs (and a Linear one) with task_vector parameters and an
    in-context step: conv-shaped fused LoRA, a task vector of 1 + r values per module."""
    from loracl.data.sources.digits import load_digits_tasks

    backbone = load_backbone("tiny-vit", seed=0)
    conv_module, linear_module = "embeddings.patch_embeddings.projection", "layers.0.attention.q_proj"
    host = LoraHost(backbone, [conv_module, linear_module])
    generator = torch.Generator().manual_seed(0)

    def adapter():
        return {
            conv_module: LoraPair(torch.randn(2, 1, 2, 2, generator=generator), torch.randn(32, 2, 1, 1, generator=generator) * 0.1, 1.0),
            linear_module: LoraPair(torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator) * 0.1, 1.0),
        }

    images = [pixels for pixels, _ in load_digits_tasks(classes_per_task=2)[0].train[:4]]
    supports = [TaskSupport(backbone.collate(images), torch.tensor([0, 1, 0, 1]), torch.nn.Linear(32, 2)) for _ in range(2)]
    adapters = [TaskAdapter(f"t{i}", adapter()) for i in range(2)]
    options = {"icm": {**QUICK, "task_vector": "parameters"}}
    outcome = fuse(adapters, "icm", options, host=host, supports=supports)
    assert outcome.report["task_vector_dim"] == 2 * (1 + 2)
    assert outcome.adapter[conv_module].lora_A.shape == (2, 1, 2, 2) and outcome.adapter[conv_module].lora_B.shape == (32, 2, 1, 1)
    assert all(torch.isfinite(pair.lora_A).all() and torch.isfinite(pair.lora_B).all() for pair in outcome.adapter.values())


# ----- every switch shows its effect ----------------------------------------------------------------------------------
DATA_FREE = {"task_vector": "parameters", "inner_steps": 0, "meta_steps": 0, "warm_start_steps": 1, "latent_dim": 8, "channel_divisor": 8}


def icm_method(num_tasks=2, **options):
    """The stream method on tiny-bert, rank 2, two checkpoints, quick fusion settings; `options` override."""
    from loracl.backbones.classifier import ContinualClassifier
    from loracl.config import HeadConfig, TrainConfig
    from loracl.methods.base import MethodContext
    from loracl.methods.registry import create_method

    model = ContinualClassifier(load_backbone("tiny-bert", max_length=16, seed=0))
    settings = {"rank": 2, "harvest_checkpoints": 2, "support_per_task": 4, "fusion": {**QUICK, "latent_dim": 4}, **options}
    method = create_method("icm_fusion", settings, MethodContext(HeadConfig(), TrainConfig(), seed=0, num_tasks=num_tasks))
    method.attach(model)
    return method


def train_icm_task(method, task, batch_size=2):
    """Every step of one epoch over the task's examples, as the engine runs a task."""
    from helpers import train_method_task

    from loracl.engine.loaders import SplitLoader

    batches = lambda shuffle: SplitLoader(task.train, method.model.backbone, batch_size, task.index, shuffle=shuffle)  # noqa: E731
    train_method_task(method, task, batches, steps=100)


def same_lora(first, second):
    return all(torch.equal(first[m].lora_A, second[m].lora_A) and torch.equal(first[m].lora_B, second[m].lora_B) for m in first)


def test_mode_decides_when_the_stream_fuses_and_what_it_rewrites():
    """After task 0 of 2: `end` has no fused branch yet and leaves task_0 as trained; `online` fuses and rewrites
    task_0 with its regeneration; `continue` fuses, keeps task_0, and starts task_1 from the fused LoRA."""
    stream = tiny_text_stream(2, train=8, test=4)
    for mode in ("end", "online", "continue"):
        method = icm_method(mode=mode)
        trained = {}
        finish = method.end_task

        def end_task(task, loader, method=method, finish=finish):
            trained.update(method._pairs("task_0"))  # the task LoRA as training left it
            finish(task, loader)

        method.end_task = end_task
        train_icm_task(method, stream.tasks[0])
        assert method._has_fused() == (mode != "end"), mode
        assert same_lora(method._pairs("task_0"), trained) == (mode != "online"), mode
        method.begin_task(stream.tasks[1])
        layer = next(iter(method.layers.values()))
        new = layer.branches["task_1"]
        if mode == "continue":
            fused = layer.branches["fused"]
            assert torch.equal(new.lora_A, fused.lora_A)
            torch.testing.assert_close(new.scaling * new.lora_B, fused.scaling * fused.lora_B)
        else:  # a fresh LoRA from the shared seed: B = 0
            assert not new.lora_B.any(), mode


def test_harvest_checkpoints_sets_how_many_weight_samples_a_task_leaves():
    """6 steps, harvested over the second half (steps 4 to 6), every (3 // count) steps, at most `count`: 0 -> none
    (and none in the state), 1 -> the final LoRA once, 2 -> two (the cap), 4 -> three (no more steps to harvest)."""
    task = tiny_text_stream(2, train=12, test=4).tasks[0]
    for count, expected in [(0, 0), (1, 1), (2, 2), (4, 3)]:
        method = icm_method(harvest_checkpoints=count)
        train_icm_task(method, task)
        assert len(method.samples[0]) == expected, count
        stored = {key.split(".")[3] for key in method.state_dict() if key.startswith("icm_fusion.sample.0.")}
        assert stored == {str(n) for n in range(expected)}, count
        if count == 1:  # harvested at the last step: the LoRA that training left
            assert same_lora(method.samples[0][0], method._pairs("task_0"))


def test_support_per_task_sets_the_size_of_the_stored_few_shot_set():
    task = tiny_text_stream(2, train=8, test=4).tasks[0]
    for k in (1, 3):
        method = icm_method(support_per_task=k)
        train_icm_task(method, task, batch_size=4)
        support = method.supports[0]
        assert support["labels"].shape == (k,) and support["input_ids"].shape[0] == k
        assert method.state_dict()["icm_fusion.support.0.labels"].shape == (k,)


def test_learned_fusion_weights_move_away_from_uniform_and_sum_to_one():
    backbone = load_backbone("tiny-bert", seed=0)
    host = LoraHost(backbone, MODULES)
    adapters = [TaskAdapter(f"t{seed}", random_adapter(seed)) for seed in range(2)]
    head = torch.nn.Linear(32, 2)
    supports = [
        TaskSupport(backbone.collate(["abc de", "fgh"]), torch.tensor([0, 1]), head),
        TaskSupport(backbone.collate(["ijk lm", "nop"]), torch.tensor([1, 1]), head),
    ]
    reports = {}
    for rule in ("uniform", "learned"):
        icm = {**QUICK, "fusion_weights": rule, "learned_weight_steps": 3, "learned_weight_lr": 0.5}
        reports[rule] = fuse(adapters, "icm", {"icm": icm}, host=host, supports=supports).report["fusion_weights"]
    assert reports["uniform"] == [0.5, 0.5]
    learned = reports["learned"]
    assert abs(learned[0] - 0.5) > 0.01 and sum(learned) == pytest.approx(1.0, abs=1e-3)  # softmax weights


def test_refine_steps_take_in_context_steps_on_the_fused_lora():
    """refine_steps k: k gradient calls per task on the fused LoRA (none at 0), and the fused LoRA moves."""
    support = TaskSupport({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, torch.zeros(1, dtype=torch.long), torch.nn.Identity())
    tasks = [FusionTask(f"t{seed}", random_adapter(seed), support) for seed in range(2)]
    fused, calls = {}, {}
    for steps in (0, 3):
        host = _RecordingHost(fill=1.0)
        fused[steps] = IcmFusion(IcmFusionOptions(**DATA_FREE, refine_steps=steps), host).fuse(tasks).adapter
        calls[steps] = len(host.seen)
    assert calls == {0: 0, 3: 3 * len(tasks)}
    assert not same_lora(fused[0], fused[3])


def test_balance_directions_gives_the_task_vectors_equal_norms_before_the_sum():
    """v_1 = (1, 0), v_2 = (0, 3), uniform weights: plain v_f = (0.5, 1.5); balanced, both get the mean norm 2,
    v_f = (1, 1). Vectors of equal norm are unchanged, so only unequal ones change the decoded fused LoRA."""
    plain = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=0), None)
    balanced = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=0, balance_directions=True), None)
    unequal, equal, weights = torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.full((2,), 0.5)
    torch.testing.assert_close(plain.fused_condition(unequal, weights), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(balanced.fused_condition(unequal, weights), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(balanced.fused_condition(equal, weights), plain.fused_condition(equal, weights))
    small, large = random_adapter(0), {m: LoraPair(p.lora_A * 3, p.lora_B * 3, p.scaling) for m, p in random_adapter(1).items()}
    adapters = [TaskAdapter("small", small), TaskAdapter("large", large)]
    outcomes = {flag: fuse(adapters, "icm", {"icm": {**DATA_FREE, "balance_directions": flag}}).adapter for flag in (False, True)}
    assert not same_lora(outcomes[False], outcomes[True])


def test_kl_weight_scales_the_kl_term_of_the_meta_loss():
    """inner_steps 0: meta loss = reconstruction MSE + kl_weight * KL, so with one noise draw the losses at
    weights 0, 0.5 and 2 differ by 0.5 KL and 2 KL, KL of the encoder's posterior (> 0)."""
    vae = FusionVAE(4096, 5, 8, channel_divisor=8)
    targets, conditions = torch.randn(2, 4096), torch.randn(2, 5)
    losses = {}
    for weight in (0.0, 0.5, 2.0):
        icm = IcmFusion(IcmFusionOptions(task_vector="parameters", inner_steps=0, kl_weight=weight), None)
        torch.manual_seed(3)
        losses[weight] = float(icm.meta_loss(vae, targets, conditions, [], None, None).detach())
    with torch.no_grad():
        kl = float(kl_divergence(*vae.encode(targets, conditions)))
    assert kl > 0
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * kl, rel=1e-4)
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * kl, rel=1e-4)


def test_noise_std_zero_adds_no_jittered_rows():
    """Two weight samples per task under min_samples 4: noise 0.01 tops each task up with two jittered copies
    (near, not equal to, their sources); noise 0 leaves exactly the two real rows."""
    support = TaskSupport({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, torch.zeros(1, dtype=torch.long), torch.nn.Identity())
    tasks = [FusionTask(f"t{seed}", random_adapter(seed), support, [random_adapter(10 + seed)]) for seed in range(2)]
    layout = FlatLayout.of(tasks[0].final)
    stacks = {}
    for noise in (0.0, 0.01):
        options = IcmFusionOptions(task_vector="parameters", inner_steps=0, min_samples=4, noise_std=noise)
        stacks[noise], _, _, _ = IcmFusion(options, None).weight_data(tasks, layout)
    for quiet, noisy in zip(stacks[0.0], stacks[0.01]):
        assert len(quiet) == 2 and len(noisy) == 4
        assert torch.equal(noisy[:2], quiet)  # the real rows come first, the same either way
        jitter = noisy[2:] - quiet
        assert (jitter != 0).any(dim=1).all() and jitter.abs().max() < 0.1
