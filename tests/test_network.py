"""The adapter network: attaches without changing the host, computes exactly the merged-weight delta, loads files."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.network import LoRANetwork
from trainer.config import NetworkConfig
from trainer.errors import ConfigError, TrainingError
from trainer.hosts.base import AdapterTarget


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    from trainer.demo.tiny_models import unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config("sd15")).eval()


@pytest.fixture(scope="module")
def tiny_te():
    from transformers import CLIPTextModel

    from trainer.demo.tiny_models import text_encoder_config

    torch.manual_seed(0)
    return CLIPTextModel(text_encoder_config()).eval()


def unet_inputs(unet, batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g))


def full_network(unet, te=None, **cfg):
    from trainer.adapters.targets import text_encoder_targets, unet_targets

    targets = unet_targets(unet, "sd15", "full")
    if te is not None:
        targets += text_encoder_targets(te, "lora_te")
    cfg = {"rank": 4, "alpha": 2, "targets": "full", "conv_rank": 2, "conv_alpha": 1, **cfg}
    return LoRANetwork(targets, NetworkConfig(**cfg))


def randomize_up(network, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.lora_modules().values():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def host_snapshot(model):
    return {
        "tree": [(name, type(m), id(m), "forward" in vars(m)) for name, m in model.named_modules()],
        "params": [(n, id(p), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": [(name, *[dict(getattr(m, d)) for d in HOOK_DICTS]) for name, m in model.named_modules()],
    }


def assert_same_host(before, after):
    assert after["tree"] == before["tree"]
    assert after["params"] == before["params"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype and torch.equal(after["state"][key], value), key


def test_attach_detach_leaves_the_host_bit_identical(tiny_unet, tiny_te):
    before = host_snapshot(tiny_unet), host_snapshot(tiny_te)
    assert all(not h[1] and not h[2] for h in before[0]["hooks"])  # the host starts without forward hooks
    network = full_network(tiny_unet, tiny_te)
    host_ids = {id(p) for p in tiny_unet.parameters()} | {id(p) for p in tiny_te.parameters()}
    assert not host_ids & {id(p) for p in network.parameters()}  # the host is not part of the network
    assert all(k.split(".")[0].startswith("lora_") for k in network.state_dict())
    randomize_up(network)
    x = unet_inputs(tiny_unet)
    network.attach()
    network.attach()  # idempotent: still one hook per target
    assert all(len(network.target(n)._forward_hooks) == 1 for n in network.lora_modules())
    with torch.no_grad():
        tiny_unet(*x)
    network.detach()
    network.detach()
    network.to(torch.float64)  # moving the network never moves the host
    assert_same_host(before[0], host_snapshot(tiny_unet))
    assert_same_host(before[1], host_snapshot(tiny_te))


def test_detach_happens_even_when_the_block_raises(tiny_unet):
    before = host_snapshot(tiny_unet)
    network = full_network(tiny_unet)
    randomize_up(network)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), network.attached():
            tiny_unet(*unet_inputs(tiny_unet))
            raise RuntimeError("boom")
    assert not network.is_attached
    assert_same_host(before, host_snapshot(tiny_unet))
    with pytest.raises(RuntimeError):  # an error inside a hooked module's forward (context width 16, not 32)
        with torch.no_grad(), network:
            tiny_unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 7, 16))
    assert_same_host(before, host_snapshot(tiny_unet))


def test_zero_up_leaves_output_unchanged_and_trained_up_changes_it(tiny_unet):
    network = full_network(tiny_unet)
    x = unet_inputs(tiny_unet)
    with torch.no_grad():
        base = tiny_unet(*x).sample
        with network.attached():
            assert torch.equal(tiny_unet(*x).sample, base)
            randomize_up(network)
            assert not torch.allclose(tiny_unet(*x).sample, base, atol=1e-3)


class OpsLinear(nn.Linear):  # like ComfyUI's comfy.ops.*.Linear
    pass


@pytest.mark.parametrize("make, x_shape", [
    (lambda: nn.Linear(16, 24), (2, 5, 16)),
    (lambda: OpsLinear(16, 24), (3, 16)),
    (lambda: nn.Conv2d(8, 12, 1), (2, 8, 6, 6)),
    (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(8, 12, 3, padding=2, dilation=2), (1, 8, 7, 7)),
])
def test_hooked_output_equals_merged_weights(make, x_shape):
    torch.manual_seed(0)
    layer = make()
    network = LoRANetwork([AdapterTarget("lora_unet_layer", layer, "unet")],
                          NetworkConfig(rank=4, alpha=2, conv_rank=3, conv_alpha=6))
    lora = network["lora_unet_layer"]
    expected_rank = 3 if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else 4
    assert lora.rank == expected_rank and lora.scale == (6 / 3 if expected_rank == 3 else 2 / 4)
    x = torch.randn(x_shape)
    randomize_up(network)
    with torch.no_grad(), network.attached():
        hooked = layer(x)
    weight = layer.weight + network["lora_unet_layer"].delta_weight()
    if isinstance(layer, nn.Conv2d):
        merged = F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    else:
        merged = F.linear(x, weight, layer.bias)
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-5)
    network.set_multiplier(0.5)
    with torch.no_grad(), network.attached():
        half = layer(x)
    torch.testing.assert_close(half - layer(x), (hooked - layer(x)) / 2, atol=1e-5, rtol=1e-4)


def test_adapters_stay_fp32_on_a_bf16_host():
    layer = nn.Linear(16, 24).to(torch.bfloat16)
    network = LoRANetwork([AdapterTarget("lora_unet_layer", layer, "unet")], NetworkConfig(rank=4, alpha=4))
    assert all(p.dtype == torch.float32 for p in network.parameters())
    randomize_up(network)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad(), network.attached():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    merged = F.linear(x.float(), layer.weight.float() + network["lora_unet_layer"].delta_weight(), layer.bias.float())
    torch.testing.assert_close(out.float(), merged, atol=0.05, rtol=0.02)


def test_rank_larger_than_a_layer_is_an_error_naming_setting_and_layer():
    with pytest.raises(ConfigError, match=r"network\.rank=32 .*lora_unet_small.*at most 16"):
        LoRANetwork([AdapterTarget("lora_unet_small", nn.Linear(16, 24), "unet")], NetworkConfig(rank=32))
    with pytest.raises(ConfigError, match=r"network\.conv_rank=5 .*lora_unet_conv .*at most 4"):
        LoRANetwork([AdapterTarget("lora_unet_conv", nn.Conv2d(2, 4, 3), "unet")],
                    NetworkConfig(rank=2, conv_rank=5))


def test_conv_rank_applies_to_3x3_convs_and_falls_back_to_rank(tiny_unet):
    with_conv = full_network(tiny_unet, rank=4, alpha=4, conv_rank=2, conv_alpha=1)
    without = full_network(tiny_unet, rank=4, alpha=4, conv_rank=0)
    for name, lora in with_conv.lora_modules().items():
        target = with_conv.target(name)
        is_3x3 = isinstance(target, nn.Conv2d) and target.kernel_size != (1, 1)
        assert (lora.rank, float(lora.alpha)) == ((2, 1.0) if is_3x3 else (4, 4.0)), name
        assert (without[name].rank, float(without[name].alpha)) == (4, 4.0)
    assert any(n.endswith("_conv1") for n in with_conv.lora_modules())


def test_param_groups_by_component(tiny_unet, tiny_te):
    network = full_network(tiny_unet, tiny_te)
    groups = network.param_groups(1e-4, 5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("te", 5e-5)]
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    frozen = full_network(tiny_unet, tiny_te).param_groups(1e-4, 0.0)
    assert [g["name"] for g in frozen] == ["unet"]


def test_dropout_only_while_training():
    layer = nn.Linear(16, 16)
    network = LoRANetwork([AdapterTarget("lora_unet_l", layer, "unet")], NetworkConfig(rank=4, dropout=0.5))
    randomize_up(network)
    x = torch.randn(4, 16)
    with torch.no_grad(), network.attached():
        network.eval()
        assert torch.equal(layer(x), layer(x))
        network.train()
        assert not torch.equal(layer(x), layer(x))


def test_kohya_state_dict_shapes_and_round_trip(tiny_unet, tiny_te):
    network = full_network(tiny_unet, tiny_te)
    randomize_up(network)
    sd = network.kohya_state_dict()
    assert set(sd) == set(network.state_dict())
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 conv (32 -> 32)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv with conv_rank 2
    linear = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # 32 -> 64
    assert sd[f"{proj}.lora_down.weight"].shape == (4, 32, 1, 1) and sd[f"{proj}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert sd[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3) and sd[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd[f"{linear}.lora_down.weight"].shape == (4, 32) and sd[f"{linear}.lora_up.weight"].shape == (64, 4)
    assert sd[f"{linear}.alpha"].shape == () and sd[f"{linear}.alpha"].dtype == torch.float32
    half = network.kohya_state_dict(torch.float16)
    assert half[f"{linear}.lora_up.weight"].dtype == torch.float16 and half[f"{linear}.alpha"].item() == 2.0

    torch.manual_seed(123)
    fresh = full_network(tiny_unet, tiny_te)
    report = fresh.load_kohya_state_dict(sd)
    assert len(report.loaded) == len(network) and not (report.missing or report.unexpected or report.rebuilt)
    for key, value in fresh.kohya_state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_load_rebuilds_modules_whose_file_rank_differs(tiny_unet):
    source = full_network(tiny_unet, rank=2, alpha=1, conv_rank=0)
    randomize_up(source)
    network = full_network(tiny_unet, rank=4, alpha=4)
    x = unet_inputs(tiny_unet)
    with torch.no_grad(), network.attached():  # loading while attached: the hooks follow the new modules
        report = network.load_kohya_state_dict(source.kohya_state_dict())
        out = tiny_unet(*x).sample
    with torch.no_grad(), source.attached():
        expected = tiny_unet(*x).sample
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert ("lora_unet_down_blocks_0_attentions_0_proj_in", 4, 2) in report.rebuilt
    assert all(lora.rank == 2 and lora.scale == 0.5 for lora in network.lora_modules().values())
    network.param_groups(1e-4)
    with pytest.raises(TrainingError, match="before building the optimizer"):
        network.load_kohya_state_dict(full_network(tiny_unet, rank=3).kohya_state_dict())


def test_load_reports_or_rejects_what_does_not_fit(tiny_unet, tiny_te):
    network = full_network(tiny_unet)
    with_te = full_network(tiny_unet, tiny_te).kohya_state_dict()
    with pytest.raises(TrainingError, match=r"match no adapter .*lora_te_.*train_text_encoder"):
        network.load_kohya_state_dict(with_te)
    report = network.load_kohya_state_dict(with_te, strict=False)
    assert report.unexpected and all(k.startswith("lora_te_") for k in report.unexpected)
    partial = {k: v for k, v in network.kohya_state_dict().items() if "mid_block" not in k}
    with pytest.raises(TrainingError, match="missing from it"):
        network.load_kohya_state_dict(partial)
    assert network.load_kohya_state_dict(partial, strict=False).missing

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    bad = network.kohya_state_dict()
    bad[f"{name}.lora_down.weight"] = torch.zeros(4, 16, 1, 1)
    with pytest.raises(TrainingError, match=f"{name}: shapes .*another model"):
        network.load_kohya_state_dict(bad)


def test_load_accepts_flattened_conv_downs_and_missing_alpha():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    network = LoRANetwork([AdapterTarget("lora_unet_c", conv, "unet")], NetworkConfig(rank=2, alpha=1))
    sd = {"lora_unet_c.lora_down.weight": torch.randn(2, 4 * 9), "lora_unet_c.lora_up.weight": torch.randn(6, 2)}
    network.load_kohya_state_dict(sd)
    assert network["lora_unet_c"].lora_down.weight.shape == (2, 4, 3, 3)
    assert network["lora_unet_c"].scale == 1.0  # no alpha in the file: alpha = rank (kohya)


def test_built_and_loaded_under_inference_mode_it_still_trains():
    layer = nn.Linear(8, 8).requires_grad_(False)
    with torch.inference_mode():  # how ComfyUI runs nodes
        network = LoRANetwork([AdapterTarget("lora_unet_l", layer, "unet")], NetworkConfig(rank=2))
        network.to(torch.float64).to(torch.float32)
        network.load_kohya_state_dict(network.kohya_state_dict())
    assert not any(p.is_inference() for p in network.parameters())
    randomize_up(network)
    with network.attached():
        layer(torch.randn(3, 8)).square().sum().backward()
    assert all(p.grad is not None for p in network.parameters())
