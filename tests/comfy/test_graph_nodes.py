"""The new nodes called in-process next to ComfyUI's modules: Dataset from Images with list inputs, Combine Datasets'
report, Save LoRA never replacing a different LoRA silently, and the per-family preview defaults."""
from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.comfy


def module(name):
    return importlib.import_module(f"loralab_pack.nodes.{name}")


def image(width, height, value):
    return torch.full((1, height, width, 3), value)


def test_dataset_from_images_takes_lists_of_different_sizes(loralab_pack):
    node = module("graph_dataset_nodes").DatasetFromImages
    assert node.define_schema().is_input_list
    out = node.execute(images=[image(64, 64, 0.2), torch.cat([image(96, 64, 0.4), image(96, 64, 0.6)])],
                       captions=["one\ntwo\nthree"], trigger_word=["ohwx"], repeats=[2]).result
    value, report = out
    assert [(i.width, i.height) for i in value.dataset.items] == [(64, 64), (96, 64), (96, 64)]
    assert [i.caption for i in value.dataset.items] == ["ohwx, one", "ohwx, two", "ohwx, three"]
    assert "3 usable image(s), 3 with a caption, 6 sample(s) per epoch" in report
    listed = node.execute(images=[image(64, 64, 0.2), image(64, 64, 0.3)], captions=["a cat", "a dog"]).result[0]
    assert [i.caption for i in listed.dataset.items] == ["a cat", "a dog"]
    with pytest.raises(Exception, match=r"Dataset from Images: 2 image\(s\) but 1 caption\(s\)"):
        node.execute(images=[image(64, 64, 0.2), image(64, 64, 0.3)], captions=["only one"])


def test_combine_datasets_shows_each_part(loralab_pack):
    images = module("graph_dataset_nodes")
    subject = images.DatasetFromImages.execute(images=[image(64, 64, 0.2)], captions=["ohwx dog"]).result[0]
    klass = images.DatasetFromImages.execute(images=[image(64, 64, 0.5), image(64, 64, 0.7)],
                                             captions=["a dog\na dog"]).result[0]
    value, report = images.CombineDatasets.execute(dataset_1=subject, regularization=klass,
                                                   prior_loss_weight=0.5).result
    assert [i.loss_weight for i in value.dataset.items] == [1.0, 0.5, 0.5]
    assert "[1: images from the graph] train, loss weight 1" in report
    assert "[2: images from the graph] regularization, loss weight 0.5" in report


def test_save_lora_never_replaces_a_different_lora_silently(loralab_pack, tmp_path, monkeypatch):
    paths, nodes = module("paths"), module("lora_nodes")
    train_node = module("train_node")
    monkeypatch.setattr(paths, "loras_root", lambda: tmp_path)

    def lora(value):
        return train_node.LoraStateDict({"lora_unet_x.lora_down.weight": torch.full((2, 4), value),
                                         "lora_unet_x.lora_up.weight": torch.full((4, 2), value),
                                         "lora_unet_x.alpha": torch.tensor(2.0)}, {"ss_steps": "4"})

    def save(value, **kw):
        args = dict(filename="loralab/mine", dtype="fp32", title="", trigger_phrase="", notes="")
        out = nodes.SaveLoRA.execute(lora=lora(value), **{**args, **kw})
        return out.result[0], "\n".join(out.ui.as_dict()["text"])

    first, said = save(1.0)
    assert first.endswith("loralab/mine.safetensors") and said.startswith("saved: ")
    again, said = save(1.0)  # the same LoRA: nothing written, nothing renamed
    assert again == first and said.startswith("unchanged: ")
    other, said = save(2.0)
    assert other.endswith("mine_00001_.safetensors") and "kept: " in said
    assert load_file(first)["lora_unet_x.lora_down.weight"][0, 0] == 1.0
    assert save(2.0)[0] == other  # found again under its counter name
    assert save(3.0)[0].endswith("mine_00002_.safetensors")
    replaced, said = save(4.0, overwrite=True)
    assert replaced == first and load_file(first)["lora_unet_x.lora_down.weight"][0, 0] == 4.0


def test_preview_defaults_fit_each_family(loralab_pack):
    settings = module("preview_settings")
    sd15 = settings.preview_settings("sd15", seed=3, resolution=512)
    assert sd15 == {"steps": 20, "cfg": 7.0, "sampler": "euler", "scheduler": "normal", "negative": "", "seed": 3,
                    "width": 512, "height": 512}
    assert settings.preview_settings("sdxl")["width"] == 1024
    flux = settings.preview_settings("flux_dev", resolution=512)
    assert flux["cfg"] == 1.0 and flux["scheduler"] == "simple" and flux["width"] == 512
    import comfy.samplers

    families = importlib.import_module("loralab_pack.trainer.families").FAMILIES  # each has a recipe KSampler knows
    assert set(settings.FAMILY_DEFAULTS) == set(families)
    for family, recipe in settings.FAMILY_DEFAULTS.items():
        assert recipe["sampler"] in comfy.samplers.KSampler.SAMPLERS, family
        assert recipe["scheduler"] in comfy.samplers.KSampler.SCHEDULERS, family
    assert settings.preview_settings("some_new_family")["cfg"] == 7.0  # the fallback
    tuned = settings.preview_settings("sd15", resolution=512, steps=8, cfg=4.5, sampler="dpmpp_2m",
                                      scheduler="karras", negative="blurry", width=640, height=385)
    assert (tuned["steps"], tuned["cfg"], tuned["sampler"], tuned["scheduler"]) == (8, 4.5, "dpmpp_2m", "karras")
    assert (tuned["negative"], tuned["width"], tuned["height"]) == ("blurry", 640, 384)
    inputs = {i.id for i in module("train_node").TrainLoRA.define_schema().inputs}
    assert {"preview_steps", "preview_cfg", "preview_sampler", "preview_scheduler", "preview_negative",
            "preview_width", "preview_height", "numbered_loras", "tensorboard"} <= inputs
