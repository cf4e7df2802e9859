"""LoHa, LoKr and DoRA next to LoRA, on the diffusers host: each computes exactly its merged weight with exact
gradients, learns in 40 CPU steps on tiny SD1.5 and SDXL, leaves the model untouched, writes the files LyCORIS /
kohya readers expect, resumes exactly, continues from its own files (and refuses another algorithm's), and is
counted by the memory estimate and checked by pre-flight. LoRA+ puts the up/B factors in their own group."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from grid_loss import fixed_grid_loss
from shapes import write_shape_dataset
from torch import nn

from trainer.adapters import algorithms as A
from trainer.adapters.network import LoRANetwork
from trainer.config import NetworkConfig, TrainConfig
from trainer.errors import ConfigError, TrainingError
from trainer.hosts.base import AdapterTarget
from trainer.hosts.diffusers_host import DiffusersHost
from trainer.training.loop import train
from trainer.training.state import list_snapshots

GRID = [100, 300, 500, 700, 900]
VARIANTS = {  # every algorithm, and LoKr's full-matrix option
    "lora": {"algorithm": "lora"}, "loha": {"algorithm": "loha"}, "lokr": {"algorithm": "lokr"},
    "lokr_full": {"algorithm": "lokr", "lokr_full_matrix": True}, "dora": {"algorithm": "dora"},
}
SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "lokr_full": {"lokr_w1", "lokr_w2", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
}


def config(variant: str, **overrides) -> TrainConfig:
    data = {"steps": 40, "batch_size": 2, "seed": 0,
            "network": {"rank": 8, "alpha": 8, "targets": "full", **VARIANTS[variant]},
            "optimizer": {"learning_rate": 3e-3, "scheduler": "constant", "weight_decay": 0.0},
            "objective": {"min_snr_gamma": 0.0}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return TrainConfig.from_dict(data)


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    from trainer.demo.tiny_models import unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config("sd15")).eval().requires_grad_(False)


def full_network(unet, variant: str, **cfg) -> LoRANetwork:
    from trainer.adapters.targets import unet_targets

    cfg = {"rank": 4, "alpha": 3, "targets": "full", "conv_rank": 2, "conv_alpha": 1, **VARIANTS[variant], **cfg}
    return LoRANetwork(unet_targets(unet, "sd15", "full"), NetworkConfig(**cfg))


def randomize(network, seed=0, std=0.2):
    """Every adapter tensor away from its (zero-effect) start, so each factor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def unet_inputs(unet, batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g))


def test_layouts_follow_the_lycoris_conventions():
    assert A.kron_split(1024) == (32, 32) and A.kron_split(1280) == (32, 40) and A.kron_split(127) == (1, 127)
    assert A.kron_split(1024, 8) == (8, 128) and A.kron_split(250, 4) == (2, 125) and A.kron_split(360, 8) == (8, 45)
    linear, conv = A.Geometry(320, 1280), A.Geometry(640, 320, (3, 3))
    assert dict(A.layout("loha", conv, 4).shapes) == {"hada_w1_a": (640, 4), "hada_w1_b": (4, 2880),
                                                       "hada_w2_a": (640, 4), "hada_w2_b": (4, 2880)}
    lokr = A.layout("lokr", linear, 4)
    assert dict(lokr.shapes) == {"lokr_w1": (16, 32), "lokr_w2_a": (20, 4), "lokr_w2_b": (4, 40)}
    assert lokr.scale(8) == 2.0 and lokr.plus == ("lokr_w2_a",) and lokr.limit == 20
    full = A.layout("lokr", conv, 4, lokr_full_matrix=True)
    assert dict(full.shapes) == {"lokr_w1": (20, 16), "lokr_w2": (32, 20, 3, 3)} and full.scale(8) == 1.0
    dora = A.layout("dora", conv, 4)
    assert dora.shapes["dora_scale"] == (1, 320, 1, 1) and A.layout("dora", linear, 4).shapes["dora_scale"] == (1, 1280)
    assert A.algorithm_of({"hada_w1_a", "alpha"}) == "loha" and A.algorithm_of({"lora_up.weight", "dora_scale"}) == "dora"
    assert A.network_module("lora") == "networks.lora" and A.network_module("loha") == "lycoris.kohya"
    assert A.network_args("dora") == {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}
    assert A.network_args("lokr", 8, True) == {"algo": "lokr", "factor": "8", "full_matrix": "True"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hooks_compute_exactly_the_merged_weight(tiny_unet, variant):
    """The hooked UNet (Linear, 1x1 and 3x3 conv adapters) equals a copy whose weights hold W + delta_weight(),
    at multiplier 1 and 0.5 (ComfyUI's strength: W + s * (W' - W))."""
    network = full_network(tiny_unet, variant)
    randomize(network)
    x = unet_inputs(tiny_unet)
    for multiplier in (1.0, 0.5):
        network.set_multiplier(multiplier)
        merged = copy.deepcopy(tiny_unet)
        modules = dict(tiny_unet.named_modules())
        with torch.no_grad():
            for path, module in merged.named_modules():
                target = modules[path]
                name = next((n for n in network.lora_modules() if network.target(n) is target), None)
                if name is not None:
                    module.weight += network[name].delta_weight().to(module.weight.dtype)
            expected = merged(*x).sample
            with network.attached():
                got = tiny_unet(*x).sample
        assert (got - expected).abs().max() < 1e-4, variant
        assert (got - tiny_unet(*x).sample).abs().max() > 1e-2  # the adapters do change the output


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_gradients_are_exact(variant, layer):
    """Analytic gradients (DoRA's through the norm, LoHa's rebuilt in backward, LoKr's factored product) equal
    a central finite difference in float64."""
    torch.manual_seed(0)
    target = (nn.Linear(24, 36) if layer == "linear" else nn.Conv2d(8, 12, 3, padding=1, stride=2)).double()
    target.requires_grad_(False)
    network = LoRANetwork([AdapterTarget("lora_unet_x", target, "unet")],
                          NetworkConfig(rank=2, alpha=3, **VARIANTS[variant]), dtype=torch.float64)
    randomize(network, std=0.3)
    shape = (3, 5, 24) if layer == "linear" else (2, 8, 9, 9)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    leaves = list(network.parameters()) + [x]

    def loss():
        with network.attached():
            return (target(x).sin() * 1.3).sum()

    grads = torch.autograd.grad(loss(), leaves)
    directions = [torch.randn_like(t) for t in leaves]
    eps = 1e-6
    with torch.no_grad():
        for t, d in zip(leaves, directions):
            t.add_(eps * d)
        plus = loss()
        for t, d in zip(leaves, directions):
            t.sub_(2 * eps * d)
        minus = loss()
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions))
    assert abs(float(numeric - analytic)) < 1e-6 * max(1.0, abs(float(numeric)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_estimate_counts_what_the_network_holds(tiny_unet, variant):
    from trainer.preflight.memory import adapter_param_count, target_rank

    network = full_network(tiny_unet, variant)
    cfg = network.config
    counted = sum(adapter_param_count(network.target(n), target_rank(network.target(n), cfg), cfg)
                  for n in network.lora_modules())
    assert counted == sum(p.numel() for p in network.parameters())
    file_keys = {k.partition(".")[2] for k in network.kohya_state_dict()}
    assert file_keys == SUFFIXES[variant]


def test_rank_limits_name_the_layer_for_each_algorithm():
    layer = AdapterTarget("lora_unet_small", nn.Linear(64, 36), "unet")  # LoKr: 36 = 6 x 6, 64 = 8 x 8
    with pytest.raises(ConfigError, match=r"network\.rank=7 .*lora_unet_small.*LoKr.*6 x 8: at most 6.*lokr_full"):
        LoRANetwork([layer], NetworkConfig(rank=7, algorithm="lokr"))
    LoRANetwork([layer], NetworkConfig(rank=7, algorithm="lokr", lokr_full_matrix=True))  # no rank to exceed
    for algorithm in ("loha", "dora"):
        with pytest.raises(ConfigError, match=r"network\.rank=40 .*lora_unet_small.*at most 36"):
            LoRANetwork([layer], NetworkConfig(rank=40, algorithm=algorithm))
    with pytest.raises(ConfigError, match="network.lokr_factor"):
        LoRANetwork([layer], NetworkConfig(algorithm="lokr", lokr_factor=0))
    with pytest.raises(ConfigError, match="network.algorithm"):
        LoRANetwork([layer], NetworkConfig(algorithm="glora"))


def test_preflight_checks_each_algorithm(tiny_models, tmp_path):
    from trainer.preflight.checks import check_model, check_settings

    host = DiffusersHost(tiny_models("sd15"))
    problems = check_model(host, config("lokr", network={"rank": 16}), None)
    rank = [p for p in problems if p.setting == "network.rank"]
    assert rank and "for LoKr" in rank[0].message and "lora_unet_" in rank[0].message
    assert "larger Kronecker factor is" in rank[0].message and "lokr_full_matrix" in rank[0].fix
    assert not check_model(host, config("lokr_full", network={"rank": 16}), None)
    bad = check_settings(config("lokr", network={"lokr_factor": 0, "algorithm": "lokr"},
                                optimizer={"loraplus_lr_ratio": -1.0}), None, "cpu")
    assert {p.setting for p in bad} >= {"network.lokr_factor", "optimizer.loraplus_lr_ratio"}
    unknown = check_settings(config("lora", network={"algorithm": "glora"}), None, "cpu")
    assert any(p.setting == "network.algorithm" and "loha" in p.fix for p in unknown)
    useless = check_settings(config("lokr_full", optimizer={"loraplus_lr_ratio": 16.0}), None, "cpu")
    assert any(p.setting == "optimizer.loraplus_lr_ratio" and p.level == "warning" for p in useless)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loraplus_gives_the_up_factors_their_own_group(tiny_unet, variant):
    from trainer.adapters.targets import text_encoder_targets, unet_targets
    from transformers import CLIPTextModel

    from trainer.demo.tiny_models import text_encoder_config

    te = CLIPTextModel(text_encoder_config()).eval()
    targets = unet_targets(tiny_unet, "sd15", "full") + text_encoder_targets(te, "lora_te")
    network = LoRANetwork(targets, NetworkConfig(rank=4, alpha=4, targets="full", **VARIANTS[variant]))
    plain = network.param_groups(1e-4, 5e-5)
    assert [(g["name"], g["lr"]) for g in plain] == [("unet", 1e-4), ("te", 5e-5)]
    groups = network.param_groups(1e-4, 5e-5, loraplus_ratio=16)
    plus = {id(p) for a in network.lora_modules().values() for p in a.plus_parameters()}
    if variant == "lokr_full":  # no low-rank pair: nothing plays the up/B role
        assert not plus and [g["name"] for g in groups] == ["unet", "te"]
        return
    expected = {"lora": ["lora_up.weight"], "dora": ["lora_up.weight"], "loha": ["hada_w1_a", "hada_w2_a"],
                "lokr": ["lokr_w2_a"]}[variant]
    for adapter in network.lora_modules().values():
        tensors = adapter.named_tensors()
        assert [n for n, t in tensors.items() if id(t) in plus] == expected
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("unet_plus", 1.6e-3), ("te", 5e-5),
                                                     ("te_plus", 8e-4)]
    assert all((id(p) in plus) == g["name"].endswith("_plus") for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))


def test_loraplus_trains_with_both_groups_on_the_schedule(tiny_models, make_latents, tmp_path):
    from trainer.training.loop import build_parts
    from trainer.training.precision import resolve_precision

    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4))
    warm = config("lora", optimizer={"learning_rate": 2e-4, "loraplus_lr_ratio": 16.0, "scheduler": "cosine",
                                     "warmup_steps": 2})
    parts = build_parts(host, latents, warm, resolve_precision("no", host.dtype, host.device), None)
    assert [(g["name"], g["lr"]) for g in parts.optimizer.param_groups] == [("unet", 1e-4), ("unet_plus", 1.6e-3)]
    parts.optimizer.step()  # no gradients yet: changes nothing
    parts.scheduler.step()  # warmup and schedule scale both groups
    assert parts.scheduler.get_last_lr() == pytest.approx([2e-4, 3.2e-3], rel=1e-3)

    def trained(ratio: float) -> float:
        cfg = config("lora", steps=20, optimizer={"learning_rate": 5e-4, "loraplus_lr_ratio": ratio})
        result = train(host, latents, cfg, tmp_path / f"run{ratio}", dataset_cfg=dataset_cfg)
        with result.network.attached():
            return fixed_grid_loss(host, latents, cfg, GRID)

    before = fixed_grid_loss(host, latents, warm, GRID)
    plus, plain = trained(16.0), trained(0.0)
    assert plus < 0.8 * before  # measured 0.65
    assert plus < 0.8 * plain  # the faster up factors learn more in the same steps (plain: 0.94 of the start)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forty_steps_lower_the_fixed_grid_loss_and_leave_the_model_untouched(tiny_models, make_latents, tmp_path,
                                                                               variant, family):
    host = DiffusersHost(tiny_models(family))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4))
    before_weights = {k: v.clone() for k, v in host.unet.state_dict().items()}
    cfg = config(variant)
    before = fixed_grid_loss(host, latents, cfg, GRID)
    result = train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)
    assert result.network.algorithm == cfg.network.algorithm
    with result.network.attached():
        after = fixed_grid_loss(host, latents, cfg, GRID)
    assert after <= 0.85 * before, f"{variant} on {family}: fixed-grid loss {before:.4f} -> {after:.4f}"
    now = host.unet.state_dict()
    assert all(torch.equal(before_weights[k], now[k]) for k in before_weights)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.unet.modules())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_file_holds_the_algorithms_keys_and_loads_back(tiny_models, make_latents, tmp_path, variant):
    from trainer.files.lora_file import build_metadata, load_lora, save_lora

    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    cfg = config(variant, steps=3, optimizer={"loraplus_lr_ratio": 4.0})
    result = train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)
    meta = build_metadata(cfg, "sd15", "epsilon", 64)
    path = save_lora(tmp_path / "out.safetensors", result.network.kohya_state_dict(), meta, dtype="fp32")
    tensors, saved_meta = load_lora(path)
    assert {k.partition(".")[2] for k in tensors} == SUFFIXES[variant]
    assert all(tensors[k].dtype == torch.float32 and tensors[k].shape == () for k in tensors if k.endswith(".alpha"))
    args = json.loads(saved_meta["ss_network_args"])
    if variant == "lora":
        assert saved_meta["ss_network_module"] == "networks.lora" and "algo" not in args
    else:
        assert saved_meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == {"dora": "lora", "loha": "loha", "lokr": "lokr", "lokr_full": "lokr"}[variant]
    assert args["loraplus_lr_ratio"] == "4.0" and args["targets"] == "full"
    if variant == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
    if variant.startswith("lokr"):
        assert args["factor"] == "-1" and (args.get("full_matrix") == "True") == (variant == "lokr_full")
    other = LoRANetwork(host.adapter_targets("full", False, False), cfg.network)
    report = other.load_kohya_state_dict(tensors)
    assert not (report.missing or report.unexpected or report.rebuilt)
    for name, adapter in other.lora_modules().items():
        assert torch.equal(adapter.delta_weight(), result.network[name].delta_weight()), name


class InterruptAfter:
    def __init__(self, steps: int):
        self.calls, self.steps = 0, steps

    def __call__(self):
        self.calls += 1
        if self.calls > self.steps:
            from trainer.errors import TrainingInterrupted

            raise TrainingInterrupted()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stop_and_resume_repeats_the_uninterrupted_run_exactly(tiny_models, make_latents, tmp_path, variant):
    """Every random stream in play (caption shuffle + dropout, flips, adapter dropout) and the EMA of every adapter
    tensor (DoRA's magnitudes included): a run stopped at step 6 and resumed equals the straight one bit for bit."""
    from trainer.errors import TrainingInterrupted

    folder = write_shape_dataset(tmp_path / "data", 4)
    cfg = config(variant, steps=12, ema_decay=0.9, network={"dropout": 0.1}, optimizer={"loraplus_lr_ratio": 4.0})
    kwargs = dict(flip=True, shuffle_captions=True, caption_dropout=0.3)
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, folder, **kwargs)
    straight = train(host, latents, cfg, tmp_path / "straight", dataset_cfg=dataset_cfg)
    with pytest.raises(TrainingInterrupted):
        train(DiffusersHost(tiny_models("sd15"), interrupt=InterruptAfter(6)), latents, cfg, tmp_path / "stopped",
              dataset_cfg=dataset_cfg)
    assert [p.name for p in list_snapshots(tmp_path / "stopped")] == ["step_000006"]
    resumed = train(DiffusersHost(tiny_models("sd15")), latents, cfg, tmp_path / "stopped", dataset_cfg=dataset_cfg,
                    resume=True)
    assert resumed.losses == straight.losses
    a, b = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(straight.ema.shadow) == len(list(straight.network.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.shadow, resumed.ema.shadow))
    with straight.ema.swap():
        averaged = straight.network.kohya_state_dict()
    assert averaged.keys() == a.keys() and any(not torch.equal(averaged[k], a[k]) for k in a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_continues_from_a_file_of_the_same_algorithm(tiny_models, make_latents, tmp_path, variant):
    """network.init_from: the run starts from the file's tensors, at the file's rank whatever the config says; a
    file of another algorithm is refused by pre-flight and by the network, naming both."""
    from trainer.files.lora_file import save_lora
    from trainer.preflight.checks import check_settings

    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    first = train(host, latents, config(variant, steps=4), tmp_path / "first", dataset_cfg=dataset_cfg)
    trained = first.network.kohya_state_dict(torch.float32)
    path = save_lora(tmp_path / "first.safetensors", trained, {}, dtype="fp32")
    frozen = {"learning_rate": 1e-12}
    cont = train(host, latents, config(variant, steps=1, optimizer=frozen, network={"rank": 4, "init_from": str(path)}),
                 tmp_path / "continued", dataset_cfg=dataset_cfg)
    got = cont.network.kohya_state_dict(torch.float32)
    assert got.keys() == trained.keys()
    assert all(got[k].shape == trained[k].shape and torch.allclose(got[k], trained[k], atol=1e-6) for k in trained)

    other = "lora" if variant != "lora" else "loha"
    wrong = config(other, steps=1, network={"init_from": str(path)})
    problems = [p for p in check_settings(wrong, None, "cpu") if p.setting == "network.init_from"]
    assert problems and A.NAMES[VARIANTS[variant]["algorithm"]] in problems[0].message
    with pytest.raises(TrainingError, match=rf"{A.NAMES[VARIANTS[variant]['algorithm']]} but network.algorithm"):
        train(host, latents, wrong, tmp_path / "wrong", dataset_cfg=dataset_cfg)


@pytest.mark.parametrize("variant", ["loha", "lokr", "dora"])
def test_memory_estimate_traces_the_real_adapters(tiny_models, variant):
    """The estimate's adapter tensors are the network's own, and its activations match what a real forward of the
    network keeps for backward (measured independently with saved-tensor hooks), as for LoRA."""
    from trainer.preflight import activation_trace as T
    from trainer.preflight import memory as M

    host = DiffusersHost(tiny_models("sd15"))
    cfg = config(variant, batch_size=1, network={"targets": "transformer"})
    network = LoRANetwork(host.adapter_targets("transformer", False, False), cfg.network)
    randomize(network, std=0.01)
    est = M.estimate_training_memory(host, cfg, [(256, 256)], 2, suggest=False, resident_encoders=False)
    name = A.NAMES[cfg.network.algorithm]
    assert est.breakdown[f"{name} adapters (fp32)"] == 4 * sum(p.numel() for p in network.parameters())
    denoiser = host.denoiser()
    params = {t.untyped_storage().data_ptr() for t in list(denoiser.parameters()) + list(network.parameters())
              + list(denoiser.buffers()) + list(network.buffers())}
    seen, alive = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            alive.append(t)

    noisy, t, cond = T._dummy_inputs(host, 2, 32, T._text_shapes(host))
    with T._grad_mode(), network.attached(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        del_out = host.predict(noisy, t, cond)
        del del_out
    activations = next(v for k, v in est.breakdown.items() if k.startswith("activations"))
    assert activations == pytest.approx(sum(seen.values()) * M.ACTIVATION_PEAK_FACTOR, rel=0.05)
    lora = M.estimate_training_memory(host, config("lora", batch_size=1, network={"targets": "transformer"}),
                                      [(256, 256)], 2, suggest=False, resident_encoders=False)
    lora_acts = next(v for k, v in lora.breakdown.items() if k.startswith("activations"))
    if variant == "dora":  # DoRA keeps its channel-scaled input as well as LoRA's own
        assert activations > 1.05 * lora_acts


def test_dora_magnitudes_start_at_the_column_norms_and_change_nothing(tiny_unet):
    network = full_network(tiny_unet, "dora")
    for name, adapter in network.lora_modules().items():
        weight = network.target(name).weight
        norms = weight.reshape(weight.shape[0], weight.shape[1], -1).norm(dim=(0, 2))
        torch.testing.assert_close(adapter.dora_scale.reshape(-1), norms)
        assert adapter.delta_weight().abs().max() < 1e-5  # m / ||W0|| = 1 and up = 0: W' = W0
    x = unet_inputs(tiny_unet)
    with torch.no_grad():
        plain = tiny_unet(*x).sample
        with network.attached():
            hooked = tiny_unet(*x).sample
    assert (plain - hooked).abs().max() < 1e-5
    assert F.mse_loss(plain, hooked) < 1e-12


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_checkpointing_gives_the_same_steps(tiny_models, make_latents, tmp_path, variant):
    """The host's checkpointing re-runs every hook in backward (DoRA's pre-hook and LoHa's rebuilt delta too):
    the trained adapters are those of the run without it."""
    host = DiffusersHost(tiny_models("sdxl"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    runs = [train(host, latents, config(variant, steps=2, gradient_checkpointing=ckpt), tmp_path / f"run{ckpt}",
                  dataset_cfg=dataset_cfg).network.kohya_state_dict() for ckpt in (False, True)]
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-6, rtol=1e-5) for k in runs[0])
    assert not host.unet.is_gradient_checkpointing


def test_the_summary_names_the_algorithm_and_loraplus():
    from trainer.presets import describe

    assert describe(config("lora")).startswith("network: LoRA rank 8, alpha 8 (scale 1)")
    assert describe(config("loha")).startswith("network: LoHa rank 8")
    assert describe(config("dora")).startswith("network: DoRA rank 8")
    assert "LoKr rank 8, alpha 8 (scale 1), balanced split" in describe(config("lokr"))
    assert "LoKr full matrix (factor 8)" in describe(config("lokr_full", network={"lokr_factor": 8}))
    assert "LoRA+ ratio 16" in describe(config("lora", optimizer={"loraplus_lr_ratio": 16.0}))
