"""ComfyHost refuses, by name and with the fix, the models it would otherwise mistake for SD1.5/SDXL: SD2.x (which
builds SD1.5's own BaseModel class) and UNets with extra input channels (inpainting, instruct-pix2pix).

The models are built in-process from ComfyUI's config classes (no checkpoint file): constructing the config class
directly skips unet_config matching, so the UNets can be tiny (one level, 64 channels). The refusal happens before
any weight is read, so the weights stay as ComfyUI's ops leave them (uninitialised).
"""
from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.comfy

# One level, one res block, one transformer layer: the smallest UNetModel the SD configs accept. 64 channels because
# SD2.x/SDXL configs use 64-channel attention heads.
TINY_UNET = dict(
    model_channels=64, in_channels=4, out_channels=4, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
    transformer_depth_output=[1, 1], transformer_depth_middle=1, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
)
SD15 = dict(TINY_UNET, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None)
SD2 = dict(TINY_UNET, context_dim=1024, use_linear_in_transformer=True, adm_in_channels=None)
# The x4 upscaler's config disables self-attention per level, for exactly four levels.
X4_LEVELS = dict(channel_mult=[1] * 4, num_res_blocks=[1] * 4, transformer_depth=[0, 0, 0, 1],
                 transformer_depth_output=[1, 1] + [0] * 6)
SDXL = dict(TINY_UNET, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")


@pytest.fixture
def comfy_host(loralab_pack):
    return importlib.import_module("loralab_pack.nodes.comfy_host")


def tiny_model(comfy, config_name: str, unet_config: dict):
    """A MODEL (ModelPatcher) of ``comfy.supported_models.<config_name>`` with ``unet_config``, on the CPU.

    ``comfy`` is the fixture (in-process ComfyUI, CPU mode); the imports below need it to have run first."""
    from comfy import model_patcher, supported_models

    config = getattr(supported_models, config_name)(unet_config)
    cpu = comfy.mm.get_torch_device()
    return model_patcher.ModelPatcher(config.get_model({}), load_device=cpu, offload_device=cpu)


def refusal(comfy_host, model) -> str:
    with pytest.raises(comfy_host.TrainingError) as info:
        comfy_host.ComfyHost(model)
    return str(info.value)


@pytest.mark.parametrize("config_name, unet_config", [
    ("SD20", SD2),
    ("SD21UnclipH", dict(SD2, adm_in_channels=2048, num_classes="sequential")),
    ("SD_X4Upscaler", dict(SD2, in_channels=7, **X4_LEVELS)),
    ("SD20", dict(SD2, in_channels=9)),  # SD2 inpainting: named as SD2.x first, the channels as its variant
])
def test_sd2_is_refused_by_name(comfy, comfy_host, config_name, unet_config):
    message = refusal(comfy_host, tiny_model(comfy, config_name, unet_config))
    assert message.startswith(f"this is an SD2.x model ({config_name}")
    assert "LoRA Lab trains SD1.5 and SDXL" in message and "Load Checkpoint" in message
    if unet_config["in_channels"] != 4:
        assert f"{unet_config['in_channels']}-channel UNet input" in message


@pytest.mark.parametrize("config_name, unet_config, family", [
    ("SD15", dict(SD15, in_channels=9), "SD1.5"),
    ("SDXL", dict(SDXL, in_channels=9), "SDXL"),
])
def test_inpainting_unet_is_refused_with_the_fix(comfy, comfy_host, config_name, unet_config, family):
    message = refusal(comfy_host, tiny_model(comfy, config_name, unet_config))
    assert "inpainting checkpoint (9-channel UNet input" in message
    assert f"train on the base {family} checkpoint instead" in message
    assert "also works on the inpainting model" in message


def test_instruct_pix2pix_unet_is_refused_with_the_fix(comfy, comfy_host):
    message = refusal(comfy_host, tiny_model(comfy, "SD15_instructpix2pix", dict(SD15, in_channels=8)))
    assert "instruct-pix2pix checkpoint (8-channel UNet input" in message
    assert "train on the base SD1.5 checkpoint instead" in message


@pytest.mark.parametrize("config_name, unet_config, family", [("SD15", SD15, "sd15"), ("SDXL", SDXL, "sdxl")])
def test_sd15_and_sdxl_are_still_accepted(comfy, comfy_host, config_name, unet_config, family):
    # Training on these is covered by test_comfy_host.py; this only checks the refusals let them through.
    assert comfy_host.ComfyHost(tiny_model(comfy, config_name, unet_config)).family == family
