"""In-process, on ComfyUI's own objects: the prediction type comes from what ComfyUI samples with (model_sampling,
including ModelSamplingDiscrete patches) and our targets match its calculate_denoised; unsupported patches are refused
by name; the model's identity ignores weights patched in place by a loaded LoRA'd clone but counts the input MODEL's
own patches; a run with previews (ComfyUI's sampler reseeds the global RNG) and adapter dropout resumes exactly."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import write_shape_dataset  # noqa: E402

try:
    from . import harness
except ImportError:
    import harness  # type: ignore[no-redef]

pytestmark = pytest.mark.comfy


@pytest.fixture
def pack(loralab_pack):
    return lambda name: importlib.import_module(f"loralab_pack.{name}")


def patched(model, comfy, parameterization, base=None, zsnr=False):
    """What the core ModelSamplingDiscrete node does: an object patch mixing a schedule and a parameterization."""
    base = base or comfy.model_sampling.ModelSamplingDiscrete

    class ModelSamplingAdvanced(base, parameterization):
        pass

    clone = model.clone()
    clone.add_object_patch("model_sampling", ModelSamplingAdvanced(model.model.model_config, zsnr=zsnr)
                           if base is comfy.model_sampling.ModelSamplingDiscrete else ModelSamplingAdvanced(
                               model.model.model_config))
    return clone


def test_prediction_follows_model_sampling_not_the_checkpoint_type(pack, comfy, tiny_models, tiny_checkpoint_vpred):
    ComfyHost = pack("nodes.comfy_host").ComfyHost
    model, clip, vae = tiny_models("sd15")
    assert ComfyHost(model.clone(), clip, vae).schedule.prediction == "eps"
    v_model = patched(model, comfy, comfy.model_sampling.V_PREDICTION, zsnr=True)
    assert v_model.model.model_type == comfy.model_base.ModelType.EPS  # what the old code looked at
    host = ComfyHost(v_model, clip, vae)
    assert host.schedule.prediction == "v" and "zero terminal SNR" in host.schedule.describe()
    sdxl_v, clip_x, vae_x = harness.load_tiny(tiny_checkpoint_vpred, te_layers=3)
    assert ComfyHost(sdxl_v.clone(), clip_x, vae_x).schedule.prediction == "v"


@pytest.mark.parametrize("kind, zsnr", [("eps", False), ("v", False), ("v", True)])
def test_our_target_is_what_comfyui_denoises_with(pack, comfy, tiny_models, kind, zsnr):
    """For the same clean latent, noise and noise level: our noisy input is ComfyUI's calculate_input of its
    noise_scaling, and ComfyUI's calculate_denoised of our target gives back the clean latent."""
    ms = comfy.model_sampling
    model, clip, vae = tiny_models("sd15")
    param = {"eps": ms.EPS, "v": ms.V_PREDICTION}[kind]
    host = pack("nodes.comfy_host").ComfyHost(patched(model, comfy, param, zsnr=zsnr), clip, vae)
    sampling, schedule = host.sampling, host.schedule
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    sigma = sampling.sigmas[t].double().view(-1, 1, 1, 1)
    noisy, target = schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t)
    xt = sampling.noise_scaling(sigma, noise, x0)
    torch.testing.assert_close(sampling.calculate_input(sigma, xt), noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sampling.calculate_denoised(sigma, target, xt), x0, rtol=1e-4, atol=1e-4)


def test_patches_we_cannot_train_are_refused_by_name(pack, comfy, tiny_models):
    ms = comfy.model_sampling
    model, clip, vae = tiny_models("sd15")
    ComfyHost, TrainingError = pack("nodes.comfy_host").ComfyHost, pack("trainer.errors").TrainingError

    class LCM(ms.EPS):  # the shape of comfy_extras' LCM parameterization
        def calculate_denoised(self, sigma, model_output, model_input):
            return model_input

    cases = [(patched(model, comfy, ms.X0), "x0"), (patched(model, comfy, LCM), "lcm"),
             (patched(model, comfy, ms.EDM, base=ms.ModelSamplingContinuousEDM), "EDM")]
    for m, name in cases:
        with pytest.raises(TrainingError, match=f"samples with {name}.*eps- and v-prediction"):
            ComfyHost(m, clip, vae)
    # a flow sampling (ModelSamplingSD3 in front of an SD1.5 UNet): the UNet was trained on eps / v
    with pytest.raises(TrainingError, match="flow schedule.*UNet was trained on eps / v"):
        ComfyHost(patched(model, comfy, ms.CONST, base=ms.ModelSamplingDiscreteFlow), clip, vae)


def _random_lora(host, pack, scale=0.5):
    targets = host.adapter_targets("attention", False, False)[:4]
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for t in targets:
        out_f, in_f = t.module.weight.shape[:2]
        sd[f"{t.name}.lora_down.weight"] = torch.randn(2, in_f, generator=gen) * scale
        sd[f"{t.name}.lora_up.weight"] = torch.randn(out_f, 2, generator=gen) * scale
        sd[f"{t.name}.alpha"] = torch.tensor(2.0)
    return sd


def test_identity_ignores_weights_patched_in_place_but_counts_the_inputs_patches(pack, comfy, tiny_models):
    model, clip, vae = tiny_models("sd15")
    ComfyHost = pack("nodes.comfy_host").ComfyHost
    base_id = ComfyHost(model.clone(), clip, vae).model_id
    lora = _random_lora(ComfyHost(model.clone(), clip, vae), pack)
    with_lora, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    weight = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    before = weight.detach().clone()
    comfy.mm.load_models_gpu([with_lora], force_full_load=True)  # what KSampler does with Train LoRA's MODEL
    try:
        now = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
        assert not torch.equal(now, before)  # the shared module really holds the LoRA'd weights now
        assert ComfyHost(model.clone(), clip, vae).model_id == base_id
        assert ComfyHost(with_lora.clone(), clip, vae).model_id != base_id  # a LoRA in front of Train LoRA counts
    finally:
        comfy.mm.unload_all_models()


def test_stop_and_resume_with_previews_and_dropout_equals_an_unstopped_run(pack, comfy, tiny_models, tmp_path):
    """Previews run ComfyUI's sampler (which reseeds torch's global RNG) between steps; adapter dropout draws from
    that RNG. With the RNG forked around previews, a run stopped after a preview and resumed equals one that was not."""
    model, clip, vae = tiny_models("sd15")
    ComfyHost = pack("nodes.comfy_host").ComfyHost
    errors, loop = pack("trainer.errors"), pack("trainer.training.loop")
    preview = pack("nodes.preview_node").training_preview
    config = pack("trainer.config")
    cfg = config.TrainConfig.from_dict({"steps": 6, "batch_size": 2, "seed": 0, "save_every": 0,
                                        "network": {"rank": 4, "alpha": 4, "dropout": 0.3},
                                        "optimizer": {"learning_rate": 1e-3}})
    folder = write_shape_dataset(tmp_path / "data", 2)
    dataset_cfg = config.DatasetConfig(folder=str(folder))
    host = ComfyHost(model.clone(), clip, vae)
    dataset = pack("trainer.data.dataset").scan_dataset(dataset_cfg)
    latents = pack("trainer.data.cache").prepare_latents(
        dataset, config.BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32), host.encode_images,
        host.image_encoder_id, tmp_path / "cache")

    def run(run_dir, stop_after=None, resume=False):
        h = ComfyHost(model.clone(), clip, vae)
        settings = {"steps": 1, "cfg": 1.0, "seed": 7, "width": 64, "height": 64}
        hooks = loop.Hooks(preview=lambda step, net: preview(h, net, ["a red circle"], [1.0], run_dir, step, settings),
                           preview_every=2)
        if stop_after is not None:
            calls = iter(range(1000))
            def check():
                if next(calls) >= stop_after:
                    raise errors.TrainingInterrupted()
            h.check_interrupt = check
        return loop.train(h, latents, cfg, run_dir, dataset_cfg=dataset_cfg, hooks=hooks, resume=resume)

    straight = run(tmp_path / "straight")
    with pytest.raises(errors.TrainingInterrupted):
        run(tmp_path / "stopped", stop_after=2)  # stopped right after the preview of step 2
    resumed = run(tmp_path / "stopped", resume=True)
    assert resumed.losses == straight.losses
    a, b = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "straight" / "previews").glob("*.png")) == [
        "step_000002.png", "step_000004.png", "step_000006.png"]
