"""The training loop on tiny real models: it learns, resumes exactly, guards NaN and leaves the model untouched."""
from __future__ import annotations

import pytest
import torch
from shapes import write_shape_dataset

from trainer.config import TrainConfig
from trainer.errors import TrainingError, TrainingInterrupted
from trainer.hosts.diffusers_host import DiffusersHost
from grid_loss import fixed_grid_loss
from trainer.training.loop import train
from trainer.training.state import list_snapshots

GRID = [100, 300, 500, 700, 900]


def config(**overrides) -> TrainConfig:
    data = {"steps": 40, "batch_size": 2, "seed": 0,
            "network": {"rank": 8, "alpha": 8, "targets": "full"},
            "optimizer": {"learning_rate": 3e-3, "scheduler": "constant", "weight_decay": 0.0},
            "objective": {"min_snr_gamma": 0.0}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return TrainConfig.from_dict(data)


def unet_state(host):
    return {k: v.clone() for k, v in host.unet.state_dict().items()}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_forty_steps_lower_fixed_grid_loss_by_30_percent(tiny_models, make_latents, tmp_path, prediction):
    host = DiffusersHost(tiny_models("sd15", prediction))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4))
    cfg = config()
    before = fixed_grid_loss(host, latents, cfg, GRID)
    result = train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)
    with result.network.attached():
        after = fixed_grid_loss(host, latents, cfg, GRID)
    assert after <= 0.7 * before, f"{prediction}: fixed-grid loss {before:.4f} -> {after:.4f}"


class InterruptAfter:
    """Plays the user pressing Stop: interrupts when `steps` optimizer steps are done."""

    def __init__(self, steps: int):
        self.calls, self.steps = 0, steps

    def __call__(self):
        self.calls += 1
        if self.calls > self.steps:
            raise TrainingInterrupted()


def test_stop_and_resume_repeats_the_uninterrupted_run_exactly(tiny_models, make_latents, tmp_path):
    # Every random stream in play: caption shuffle + dropout, flips, adapter dropout, EMA.
    folder = write_shape_dataset(tmp_path / "data", 4)
    cfg = config(steps=20, ema_decay=0.9, network={"dropout": 0.1})
    kwargs = dict(flip=True, shuffle_captions=True, caption_dropout=0.3)

    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, folder, **kwargs)
    straight = train(host, latents, cfg, tmp_path / "straight", dataset_cfg=dataset_cfg)

    stopped_host = DiffusersHost(tiny_models("sd15"), interrupt=InterruptAfter(10))
    with pytest.raises(TrainingInterrupted):
        train(stopped_host, latents, cfg, tmp_path / "stopped", dataset_cfg=dataset_cfg)
    assert [p.name for p in list_snapshots(tmp_path / "stopped")] == ["step_000010"]
    resumed = train(DiffusersHost(tiny_models("sd15")), latents, cfg, tmp_path / "stopped",
                    dataset_cfg=dataset_cfg, resume=True)

    assert resumed.losses == straight.losses
    a, b = straight.network.kohya_state_dict(), resumed.network.kohya_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.shadow, resumed.ema.shadow))


class NaNAtStep(DiffusersHost):
    def __init__(self, folder, step):
        super().__init__(folder)
        self.calls, self.nan_step = 0, step

    def predict(self, noisy, timesteps, cond):
        self.calls += 1
        out = super().predict(noisy, timesteps, cond)
        return out * float("nan") if self.calls == self.nan_step else out


def test_nan_stops_naming_the_step_and_keeps_the_previous_state(tiny_models, make_latents, tmp_path):
    host = NaNAtStep(tiny_models("sd15"), step=5)
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4))
    before = unet_state(host)
    with pytest.raises(TrainingError, match="at step 5"):
        train(host, latents, config(steps=10, save_every=2), tmp_path / "run", dataset_cfg=dataset_cfg)
    assert list_snapshots(tmp_path / "run")[-1].name == "step_000004"
    after = unet_state(host)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in host.unet.modules())


def test_the_input_model_is_bit_identical_after_training(tiny_models, make_latents, tmp_path):
    host = DiffusersHost(tiny_models("sdxl"))
    modules_before = [(n, type(m)) for n, m in host.unet.named_modules()]
    before = unet_state(host)
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    result = train(host, latents, config(steps=3, gradient_checkpointing=True), tmp_path / "run",
                   dataset_cfg=dataset_cfg)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert [(n, type(m)) for n, m in host.unet.named_modules()] == modules_before
    after = unet_state(host)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.unet.modules())
    assert not host.unet.is_gradient_checkpointing


class RecordingHost(DiffusersHost):
    def predict(self, noisy, timesteps, cond):
        self.seen = cond
        return super().predict(noisy, timesteps, cond)


def test_each_sample_is_conditioned_on_its_own_caption(tiny_models, make_latents, tmp_path):
    captions = ["a red square", "a blue circle"]
    host = RecordingHost(tiny_models("sdxl"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2, captions=captions))
    train(host, latents, config(steps=1), tmp_path / "run", dataset_cfg=dataset_cfg)
    expected = host.encode_text(captions)
    seen = host.seen
    assert seen.context.shape[0] == 2  # a batch of 2, not 2 x 2
    rows = {tuple(seen.context[i].flatten()[:8].tolist()) for i in range(2)}
    wanted = {tuple(e["context"].flatten()[:8].tolist()) for e in expected}
    assert rows == wanted
    assert {tuple(seen.pooled[i][:4].tolist()) for i in range(2)} == {tuple(e["pooled"][:4].tolist()) for e in expected}
    assert seen.size_ids.shape == (2, 6)


def test_resume_refuses_a_run_with_different_settings(tiny_models, make_latents, tmp_path):
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    train(host, latents, config(steps=2), tmp_path / "run", dataset_cfg=dataset_cfg)
    with pytest.raises(TrainingError, match="different training settings"):
        train(host, latents, config(steps=2, network={"rank": 4}), tmp_path / "run", dataset_cfg=dataset_cfg,
              resume=True)


class OOMAtStep(DiffusersHost):
    def __init__(self, folder, step):
        super().__init__(folder)
        self.calls, self.oom_step = 0, step

    def predict(self, noisy, timesteps, cond):
        self.calls += 1
        if self.calls == self.oom_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict(noisy, timesteps, cond)


def test_out_of_memory_saves_a_resumable_state_and_explains(tiny_models, make_latents, tmp_path):
    from trainer.training.loop import Hooks

    host = OOMAtStep(tiny_models("sd15"), step=4)
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    hooks = Hooks(oom_report=lambda step: f"the estimate was 9 GiB; peak at step {step}")
    with pytest.raises(TrainingError, match=r"out of memory at step 4.*step_000003.*estimate was 9 GiB"):
        train(host, latents, config(steps=6), tmp_path / "run", dataset_cfg=dataset_cfg, hooks=hooks)
    resumed = train(DiffusersHost(tiny_models("sd15")), latents, config(steps=6), tmp_path / "run",
                    dataset_cfg=dataset_cfg, resume=True)
    assert resumed.step == 6 and len(resumed.losses) == 6


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_encoder_adapters_train_headless(tiny_models, make_latents, tmp_path, family):
    host = DiffusersHost(tiny_models(family))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    cfg = config(steps=2, network={"train_text_encoder": True}, optimizer={"text_encoder_lr": 1e-2})
    before = {(i, k): v.clone() for i, e in enumerate(host.encoders) for k, v in e.state_dict().items()}
    result = train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)
    prefix = "lora_te_" if family == "sd15" else "lora_te2_"
    te = {k: v for k, v in result.network.kohya_state_dict().items() if k.startswith(prefix)}
    assert te and any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in te.items())
    after = {(i, k): v for i, e in enumerate(host.encoders) for k, v in e.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_continues_from_an_existing_lora_file(tiny_models, make_latents, tmp_path):
    """network.init_from: the run starts from the file's weights (and its rank, whatever the config says)."""
    from trainer.files.lora_file import save_lora

    folder = write_shape_dataset(tmp_path / "data", 4)
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, folder)
    first = train(host, latents, config(steps=6), tmp_path / "first", dataset_cfg=dataset_cfg)
    trained = first.network.kohya_state_dict(torch.float32)
    save_lora(tmp_path / "first.safetensors", trained, {}, dtype="fp32")

    # one step at a negligible learning rate: what comes out is what went in
    frozen = {"learning_rate": 1e-12}
    cont = train(host, latents, config(steps=1, optimizer=frozen, network={"rank": 4, "init_from": str(
        tmp_path / "first.safetensors")}), tmp_path / "continued", dataset_cfg=dataset_cfg)
    fresh = train(host, latents, config(steps=1, optimizer=frozen, network={"rank": 4}), tmp_path / "fresh",
                  dataset_cfg=dataset_cfg)
    got, new = cont.network.kohya_state_dict(torch.float32), fresh.network.kohya_state_dict(torch.float32)
    assert got.keys() == trained.keys()
    assert all(torch.allclose(got[k], trained[k], atol=1e-6) for k in trained)
    ups = [k for k in trained if k.endswith("lora_up.weight")]
    assert all(got[k].shape[1] == 8 and new[k].shape[1] == 4 for k in ups)  # the file's rank wins
    # a fresh network starts with zero up-weights; the continued one with the trained ones
    assert all(new[k].abs().max() < 1e-9 for k in ups) and all(got[k].abs().max() > 1e-4 for k in ups)


def test_previews_that_reseed_the_global_rng_do_not_change_a_resumed_run(tiny_models, make_latents, tmp_path):
    """ComfyUI's sampler reseeds torch's global RNG, which adapter dropout draws from. A run stopped right after a
    preview and resumed must still equal the unstopped run (the loop forks the RNG around previews)."""
    from trainer.training.loop import Hooks

    folder = write_shape_dataset(tmp_path / "data", 4)
    cfg = config(steps=6, network={"dropout": 0.3})
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, folder)

    def reseeding_preview(step, network):
        torch.manual_seed(1000 + step)  # what comfy.sample.prepare_noise does
        torch.rand(10)
        return None

    def hooks():
        return Hooks(preview=reseeding_preview, preview_every=2)

    straight = train(host, latents, cfg, tmp_path / "straight", dataset_cfg=dataset_cfg, hooks=hooks())
    stopped_host = DiffusersHost(tiny_models("sd15"), interrupt=InterruptAfter(2))
    with pytest.raises(TrainingInterrupted):
        train(stopped_host, latents, cfg, tmp_path / "stopped", dataset_cfg=dataset_cfg, hooks=hooks())
    resumed = train(host, latents, cfg, tmp_path / "stopped", dataset_cfg=dataset_cfg, hooks=hooks(), resume=True)
    assert resumed.losses == straight.losses
