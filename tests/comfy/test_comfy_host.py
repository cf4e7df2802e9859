"""The ComfyUI host in-process, on ComfyUI's own model objects: the engine trains through it, the base MODEL stays
bit-identical (after success, an error and Stop), names match ComfyUI's key map, each sample sees its own caption."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import write_shape_dataset  # noqa: E402  (tests/shapes.py: real PNG files + captions)

pytestmark = pytest.mark.comfy


@pytest.fixture
def pack(loralab_pack):
    return lambda name: importlib.import_module(f"loralab_pack.{name}")


def module_snapshot(root):
    return ({k: v.clone() for k, v in root.state_dict().items()},
            [(n, type(m).__name__) for n, m in root.named_modules()])


def assert_module_unchanged(root, before):
    weights, tree = before
    now = root.state_dict()
    assert [(n, type(m).__name__) for n, m in root.named_modules()] == tree
    changed = [k for k in weights if not _same_bits(weights[k], now[k])]
    assert not changed, changed[:5]
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in root.modules())


def _same_bits(a, b) -> bool:
    """Bit-identical (NaN-safe: weights ComfyUI leaves uninitialised may hold NaN bit patterns)."""
    a, b = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def snapshot(model):
    return module_snapshot(model.model.diffusion_model)


def assert_unchanged(model, before):
    assert_module_unchanged(model.model.diffusion_model, before)


def latents_for(pack, host, folder, tmp_path, **dataset_kwargs):
    config = pack("trainer.config")
    dataset_cfg = config.DatasetConfig(folder=str(folder), **dataset_kwargs)
    buckets = config.BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32)
    dataset = pack("trainer.data.dataset").scan_dataset(dataset_cfg)
    latents = pack("trainer.data.cache").prepare_latents(dataset, buckets, host.encode_images, host.image_encoder_id,
                                                     tmp_path / "cache")
    return latents, dataset_cfg


def small_config(pack, **changes):
    data = {"steps": 3, "batch_size": 2, "seed": 0, "network": {"rank": 4, "alpha": 4},
            "optimizer": {"learning_rate": 1e-3}}
    data.update(changes)
    return pack("trainer.config").TrainConfig.from_dict(data)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_training_through_comfy_host_leaves_the_model_untouched(pack, tiny_models, tmp_path, kind):
    model, clip, vae = tiny_models(kind)
    before = snapshot(model)
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    assert host.family == kind and host.schedule.prediction == "eps"
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2), tmp_path)
    result = pack("trainer.training.loop").train(host, latents, small_config(pack, gradient_checkpointing=True),
                                        tmp_path / "run", dataset_cfg=dataset_cfg, text_cache_dir=tmp_path / "text")
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert_unchanged(model, before)


def test_names_are_all_in_comfyuis_key_map(pack, tiny_models, comfy):
    for kind in ("sd15", "sdxl"):
        model, clip, vae = tiny_models(kind)
        host = pack("nodes.comfy_host").ComfyHost(model, clip, vae)
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model,
                                                  comfy.lora.model_lora_keys_unet(model.model, {}))
        te_targets = pack("trainer.adapters.targets").all_text_encoder_targets(host.text_encoders())
        names = [t.name for t in host.adapter_targets("full", True, False) + te_targets]
        assert names and all(name in key_map for name in names), [n for n in names if n not in key_map][:5]


class Boom(Exception):
    pass


def test_model_untouched_after_an_error_and_after_stop(pack, tiny_models, tmp_path):
    model, clip, vae = tiny_models("sd15")
    before = snapshot(model)
    comfy_host = pack("nodes.comfy_host")
    loop = pack("trainer.training.loop")
    host_error = pack("trainer.errors")

    class FailingHost(comfy_host.ComfyHost):
        calls = 0

        def predict(self, *args, **kwargs):
            FailingHost.calls += 1
            if FailingHost.calls == 2:
                raise Boom("inside training")
            return super().predict(*args, **kwargs)

    host = FailingHost(model.clone(), clip, vae)
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2), tmp_path)
    with pytest.raises(Boom):
        loop.train(host, latents, small_config(pack, gradient_checkpointing=True), tmp_path / "err",
                   dataset_cfg=dataset_cfg)
    assert_unchanged(model, before)

    stop = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    stop.check_interrupt = lambda: (_ for _ in ()).throw(host_error.TrainingInterrupted())
    with pytest.raises(host_error.TrainingInterrupted):
        loop.train(stop, latents, small_config(pack), tmp_path / "stop", dataset_cfg=dataset_cfg)
    assert (tmp_path / "stop" / "state" / "step_000000" / "meta.json").is_file()
    assert_unchanged(model, before)


def test_batch_of_two_conditions_each_image_on_its_own_caption(pack, tiny_models, tmp_path):
    model, clip, vae = tiny_models("sdxl")
    captions = ["a red square", "a blue circle on grass"]
    comfy_host = pack("nodes.comfy_host")
    seen = []

    class Spy(comfy_host.ComfyHost):
        def predict(self, noisy, timesteps, cond):
            seen.append((noisy.shape[0], cond, self._adm(cond, noisy)))
            return super().predict(noisy, timesteps, cond)

    host = Spy(model.clone(), clip, vae)
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2, captions=captions),
                                       tmp_path)
    pack("trainer.training.loop").train(host, latents, small_config(pack, steps=1), tmp_path / "run", dataset_cfg=dataset_cfg)
    batch, cond, adm = seen[0]
    assert batch == 2 and cond.context.shape[0] == 2 and adm.shape == (2, 2816)  # B rows, not B x B
    expected = {c: host.encode_text([c])[0] for c in captions}
    for row in range(2):
        matches = [c for c, e in expected.items() if torch.allclose(cond.context[row].cpu(), e["context"], atol=1e-5)]
        assert len(matches) == 1  # each row is exactly one caption's own encoding, not an average
        assert torch.allclose(cond.pooled[row].cpu(), expected[matches[0]]["pooled"], atol=1e-5)
    assert {c for c in captions} == {c for c in expected}


def test_gradient_checkpointing_recomputes_the_unet_layers(pack, tiny_models, tmp_path, monkeypatch):
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    model, clip, vae = tiny_models("sd15")
    calls = []
    original = openaimodel.ResBlock.forward
    monkeypatch.setattr(openaimodel.ResBlock, "forward", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    resblocks = sum(isinstance(m, openaimodel.ResBlock) for m in host.unet.modules())
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2), tmp_path)
    loop = pack("trainer.training.loop")
    # With checkpointing every ResBlock runs again in backward except the last (its recompute would save nothing)
    # and the first: it comes before any adapter and its weights are frozen, so backward never reaches it (had the
    # base weights kept requires_grad, as ComfyUI leaves them, it would be recomputed for a useless weight gradient).
    for checkpointing, expected in ((False, resblocks), (True, 2 * resblocks - 2)):
        calls.clear()
        loop.train(host, latents, small_config(pack, steps=1, batch_size=1, gradient_checkpointing=checkpointing),
                   tmp_path / f"run{checkpointing}", dataset_cfg=dataset_cfg)
        assert len(calls) == expected


def test_node_list_loads_without_the_engine(loralab_pack):
    import asyncio

    before = set(sys.modules)
    extension = asyncio.run(loralab_pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert {n.define_schema().node_id for n in nodes} == {
        "LoraLab_LoadDataset", "LoraLab_DatasetFromImages", "LoraLab_CombineDatasets", "LoraLab_CacheLatents",
        "LoraLab_ConfigureLoRA", "LoraLab_TrainLoRA", "LoraLab_SaveLoRA", "LoraLab_SamplePreview",
        "LoraLab_CompareLoRAs"}
    loaded = {m for m in set(sys.modules) - before if m.startswith("loralab_pack.trainer")}
    # engine modules load inside node execution only; the torch-free list of choices feeds the drop-downs
    assert loaded <= {"loralab_pack.trainer", "loralab_pack.trainer.choices"}
    missing = [(n.define_schema().node_id, i.id) for n in nodes for i in n.define_schema().inputs if not i.tooltip]
    assert missing == []  # every input explains itself in the UI


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_text_encoder_adapters_train_in_comfyui(pack, tiny_models, tmp_path, comfy, kind):
    """train_text_encoder inside ComfyUI: the text-encoder adapters learn (through ComfyUI's own CLIP code, whose
    residual sums are in place), the base MODEL and CLIP come back bit-identical, and ComfyUI applying the LoRA's
    text-encoder part gives the same conditioning as our adapters."""
    model, clip, vae = tiny_models(kind)
    before, clip_before = snapshot(model), module_snapshot(clip.cond_stage_model)
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2), tmp_path)
    cfg = small_config(pack, steps=3, network={"rank": 4, "alpha": 4, "train_text_encoder": True})
    result = pack("trainer.training.loop").train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    lora = result.network.kohya_state_dict(torch.float32)
    te_ups = [k for k in lora if k.startswith("lora_te") and k.endswith("lora_up.weight")]
    untrained = {k for k in te_ups if not lora[k].any()}
    if kind == "sdxl":  # SDXL conditions on CLIP-L's penultimate layer: its last layer gets no gradient
        last = len(clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers) - 1
        assert untrained == {k for k in te_ups if k.startswith(f"lora_te1_text_model_encoder_layers_{last}_")}
    else:
        assert not untrained  # every text-encoder adapter was trained
    assert len(untrained) < len(te_ups)
    assert {k.split("text_model")[0] for k in te_ups} == {"sd15": {"lora_te_"}, "sdxl": {"lora_te1_", "lora_te2_"}}[kind]
    assert_unchanged(model, before)
    assert_module_unchanged(clip.cond_stage_model, clip_before)

    caption = "a red square"
    _, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    theirs, theirs_pooled = clip_lora.encode_from_tokens(clip_lora.tokenize(caption), return_pooled=True)
    base, base_pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
    with result.network.attached():
        ours = host.encode_text([caption])[0]
    # ComfyUI merges the LoRA into the CLIP's fp16 weights; our adapters add in fp32: equal up to fp16 rounding,
    # which is far below what the text-encoder part changes.
    effect = (theirs.float() - base.float()).abs().max()
    assert effect > 1e-3
    assert (theirs[0].float() - ours["context"]).abs().max() < 0.02 * effect
    if kind == "sdxl":
        pooled_effect = (theirs_pooled.float() - base_pooled.float()).abs().max()
        assert (theirs_pooled[0].float() - ours["pooled"]).abs().max() < 0.02 * pooled_effect


CONFIGURE_LORA = dict(preset="custom", rank=4, alpha=4.0, dropout=0.0, targets="transformer", conv_rank=0,
                      optimizer="adamw", learning_rate=1e-4, text_encoder_lr=0.0, scheduler="constant",
                      warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0, grad_accumulation=1, loss="mse",
                      timestep_sampling="uniform", min_snr_gamma=5.0, noise_offset=0.0, mixed_precision="no",
                      gradient_checkpointing=False, train_text_encoder=False, ema_decay=0.0, clip_skip=1)


def test_configure_lora_shows_the_memory_estimate_per_batch_size(pack, tiny_models, tmp_path):
    """Configure LoRA with MODEL + latents connected: the breakdown, a verdict, a batch-size table and the largest
    batch that fits, before any training; the MODEL is left as it was. Without them: the plain summary."""
    model, clip, vae = tiny_models("sd15")
    before = snapshot(model)
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2), tmp_path)
    value = pack("nodes.dataset_nodes").LatentsValue(latents, dataset_cfg, None, tmp_path / "cache", 2)
    node = pack("nodes.config_node").ConfigureLoRA
    settings = dict(CONFIGURE_LORA)
    plain = node.execute(**settings).result[1]
    assert "Memory estimate" not in plain
    summary = node.execute(**settings, model=model, latents=value).result[1]
    assert summary.startswith(plain)
    assert "Memory estimate (cpu)" in summary and "FITS" in summary and "model weights" in summary
    assert "by batch size: 1: " in summary and "8: " in summary and "largest that fits: 8" in summary
    assert_unchanged(model, before)
    half = node.execute(**settings, model=model).result[1]
    assert "connect latents as well" in half
    with_te = node.execute(**{**settings, "train_text_encoder": True}, model=model, latents=value).result[1]
    assert "Memory estimate (cpu)" in with_te and "without the text encoder" in with_te


def test_configure_lora_continues_from_a_lora_in_models_loras(pack, tiny_models, tmp_path, monkeypatch):
    """continue_from lists LoRAs as LoraLoader does; the picked file's weights start the run; the run key follows the
    file's content (an overwritten file is not mistaken for the finished run)."""
    import folder_paths

    loras = tmp_path / "loras"
    loras.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(loras)], folder_paths.folder_names_and_paths["loras"][1]))
    model, clip, vae = tiny_models("sd15")
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 2), tmp_path)
    train, save_lora = pack("trainer.training.loop").train, pack("trainer.files.lora_file").save_lora
    first = train(host, latents, small_config(pack, steps=2), tmp_path / "first", dataset_cfg=dataset_cfg)
    trained = first.network.kohya_state_dict(torch.float32)
    save_lora(loras / "mine.safetensors", trained, {}, dtype="fp32")

    node = pack("nodes.config_node").ConfigureLoRA
    options = next(i for i in node.define_schema().inputs if i.id == "continue_from").options
    assert options == ["none", "mine.safetensors"]
    cfg, summary = node.execute(**CONFIGURE_LORA, continue_from="mine.safetensors").result
    assert cfg.network.init_from == str(loras / "mine.safetensors") and "continues from" in summary
    assert node.execute(**CONFIGURE_LORA).result[0].network.init_from == ""

    cfg.optimizer.learning_rate = 1e-12  # one step that changes nothing: the run starts from the file
    cfg.steps, cfg.batch_size = 1, 2
    cont = train(host, latents, cfg, tmp_path / "continued", dataset_cfg=dataset_cfg)
    got = cont.network.kohya_state_dict(torch.float32)
    assert all(torch.allclose(got[k], trained[k], atol=1e-6) for k in trained)

    identity = pack("trainer.training.identity").RunIdentity.of
    key = identity(host, cfg, latents.samples, dataset_cfg).key
    save_lora(loras / "mine.safetensors", {k: v * 2 for k, v in trained.items()}, {}, dtype="fp32")
    assert identity(host, cfg, latents.samples, dataset_cfg).key != key


def test_one_runs_root_for_training_and_the_panel(pack, comfy, tmp_path, monkeypatch):
    paths, routes = pack("nodes.paths"), pack("nodes.routes")
    monkeypatch.delenv("LORALAB_RUNS_ROOT", raising=False)
    assert paths.runs_root() == Path(comfy.folder_paths.get_output_directory()) / "loralab" / "runs"
    assert routes.runs_root() == paths.runs_root()
    monkeypatch.setenv("LORALAB_RUNS_ROOT", str(tmp_path / "runs"))
    assert paths.runs_root() == routes.runs_root() == tmp_path / "runs"
