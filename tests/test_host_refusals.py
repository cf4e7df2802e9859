"""The diffusers host refuses, by name and with the fix, folders it would otherwise load as SD1.5/SDXL: SD2.x (one
text encoder like SD1.5, but 1024-wide cross-attention) and UNets with extra input channels (inpainting,
instruct-pix2pix). The ComfyUI host's twin of these tests is tests/comfy/test_refusals.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.demo.tiny_models import scheduler_config, unet_config
from trainer.errors import TrainingError
from trainer.hosts.diffusers_host import DiffusersHost


def variant(tiny_models, tmp_path: Path, family: str = "sd15", prediction: str = "epsilon", **unet_changes) -> Path:
    """A copy of a tiny model folder whose UNet is rebuilt with ``unet_changes`` (a real, loadable diffusers UNet)."""
    from diffusers import UNet2DConditionModel

    folder = shutil.copytree(tiny_models(family), tmp_path / "model")
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(**{**unet_config(family), **unet_changes}).save_pretrained(folder / "unet")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(prediction)))
    return folder


def refusal(folder: Path) -> str:
    with pytest.raises(TrainingError) as info:
        DiffusersHost(folder)
    return str(info.value)


def test_sd2_folder_is_refused_by_name(tiny_models, tmp_path):
    message = refusal(variant(tiny_models, tmp_path, prediction="v_prediction", cross_attention_dim=1024))
    assert message.startswith("this is an SD2.x model (StableDiffusionPipeline, 1024-wide cross-attention with one "
                              "text encoder, v-prediction)")
    assert "LoRA Lab trains SD1.5 and SDXL" in message and "set 'model' to the diffusers folder" in message


@pytest.mark.parametrize("family, family_name", [("sd15", "SD1.5"), ("sdxl", "SDXL")])
def test_inpainting_unet_is_refused_with_the_fix(tiny_models, tmp_path, family, family_name):
    message = refusal(variant(tiny_models, tmp_path, family, in_channels=9))
    assert "inpainting checkpoint (9-channel UNet input" in message
    assert f"train on the base {family_name} checkpoint instead" in message
    assert "also works on the inpainting model" in message


def test_instruct_pix2pix_unet_is_refused_with_the_fix(tiny_models, tmp_path):
    message = refusal(variant(tiny_models, tmp_path, in_channels=8))
    assert "instruct-pix2pix checkpoint (8-channel UNet input" in message


def test_unknown_extra_channels_are_named(tiny_models, tmp_path):
    message = refusal(variant(tiny_models, tmp_path, in_channels=7))
    assert "UNet takes 7 input channels but its latents have 4 (StableDiffusionPipeline)" in message


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sd15_and_sdxl_folders_are_still_accepted(tiny_models, family):
    assert DiffusersHost(tiny_models(family)).family == family
