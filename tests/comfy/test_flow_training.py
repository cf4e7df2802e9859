"""Every flow / DiT family trains through the one generic ComfyUI host path (nodes/dit.py + trainer/families.py).

Per family (tiny random-weight MODELs built with ComfyUI's own classes, tests/comfy/tiny_flow.py): 30 CPU steps lower
the flow loss on a fixed sigma grid with fixed noise by >= 20 %; the base MODEL is bit-identical afterwards; the saved
file loads in stock LoraLoader with every key consumed and the MODEL it patches gives what our hooks gave (max abs
diff <= 1e-3 on a fixed latent); names follow kohya's rule. Text conditioning comes from a stand-in encoder with
each family's shapes (the real tiny encoders are exercised in test_flow_text.py)."""
from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_checks import assert_unchanged, snapshot  # noqa: E402
try:
    from . import tiny_flow
except ImportError:
    import tiny_flow  # type: ignore[no-redef]

pytestmark = pytest.mark.comfy

FAMILIES = list(tiny_flow.FAMILIES)
GRID = [0.1, 0.3, 0.5, 0.7, 0.9]
TOKENS = 8


@pytest.fixture
def pack(loralab_pack):
    return lambda name: importlib.import_module(f"loralab_pack.{name}")


def stand_in_text(family: str):
    """encode_text with the family's shapes, fixed per caption (what a text cache entry holds)."""
    def encode(captions, clip_skip=1):
        out = []
        for caption in captions:
            seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
            c = tiny_flow.conditioning(family, tokens=TOKENS, seed=seed)[0]
            item = {"context": c["cross_attn"][0]}
            if torch.is_tensor(c.get("pooled_output")):
                item["pooled"] = c["pooled_output"][0]
            for key in ("attention_mask", "conditioning_llama3"):
                if key in c:
                    item[f"extra.{key}"] = c[key][0]
            out.append(item)
        return out

    return encode


def flow_host(pack, model, family):
    host = pack("nodes.comfy_host").ComfyHost(model.clone())
    host.encode_text = stand_in_text(family)
    host.text_encoder_id = f"stand-in-{family}"
    return host


def flow_latents(pack, host, family: str, count: int = 4):
    """Fixed random unscaled latents (the VAE path is the SD one, tested elsewhere), one caption each, sized so
    that the model sees about unit-variance latents after the family's own scaling (as real VAE latents are)."""
    cache = pack("trainer.data.cache")
    spec = tiny_flow.FAMILIES[family]
    g = torch.Generator().manual_seed(3)
    side = 64 // spec.vae_scale
    probe = torch.randn(1, spec.latent_channels, side, side, generator=g)
    scale = float(host.scale_latents(probe).std() / probe.std())
    samples = []
    for i in range(count):
        latent = (torch.randn(spec.latent_channels, side, side, generator=g) * 0.6 + (i - 1.5) * 0.3) / scale
        samples.append(cache.LatentSample(latent, None, f"sample {i}", 1, (64, 64), 64, (64, 64), (0, 0), None,
                                          f"mem://{i}"))
    return cache.LatentSet(samples, report=None)


@torch.no_grad()
def grid_loss(pack, host, latents) -> float:
    """Mean flow loss over every sample at fixed sigmas with fixed noise."""
    loop = pack("trainer.training.loop")
    obj = pack("trainer.config").ObjectiveConfig(timestep_sampling="uniform")
    gen = torch.Generator().manual_seed(1234)
    items = host.encode_text([s.caption for s in latents.samples])
    total, count = 0.0, 0
    for sample, item in zip(latents.samples, items):
        x0 = host.scale_latents(sample.latent.unsqueeze(0).float())
        cond = pack("trainer.hosts.base").Conditioning(item["context"][None], None, None, [item])
        for sigma in GRID:
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.tensor([sigma])
            noisy = host.schedule.add_noise(x0, noise, t)
            pred = host.predict(noisy, t, cond).float()
            total += float(((pred - host.schedule.target(x0, noise, t)) ** 2).mean())
            count += 1
    del loop, obj
    return total / count


# The tiny random AuraFlow learns through its block Linears more slowly than the others (-6 % in 30 steps at 2e-3,
# -25 % at 1e-2); a real one is trained at the same rates as the rest.
# LoKr's Kronecker factors hold far fewer parameters per layer; LyCORIS trains them at higher rates too.
LEARNING_RATE = {"auraflow": 1e-2, "lokr": 6e-3}


def train_config(pack, family="", steps=30, **network):
    return pack("trainer.config").TrainConfig.from_dict({
        "steps": steps, "batch_size": 2, "seed": 0, "gradient_checkpointing": True,
        "network": {"rank": 8, "alpha": 8, "targets": "transformer", **network},
        "optimizer": {"learning_rate": LEARNING_RATE.get(network.get("algorithm"), LEARNING_RATE.get(family, 2e-3)),
                      "scheduler": "constant",
                      "weight_decay": 0.0}})


def load_in_comfyui(comfy, model, sd, caplog):
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
        model_lora, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "lora key not loaded" in m or "NOT LOADED" in m], messages[:5]
    return patches, model_lora


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_and_reproduces_in_stock_loraloader(pack, comfy, tmp_path, caplog, family):
    train_and_compare(pack, comfy, tmp_path, caplog, family)


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "dora"])
def test_each_adapter_algorithm_on_flux(pack, comfy, tmp_path, caplog, algorithm):
    """LoHa, LoKr and DoRA on a flow family too (LoRA is the family test above)."""
    train_and_compare(pack, comfy, tmp_path, caplog, "flux_dev", algorithm=algorithm,
                      **({"lokr_factor": -1} if algorithm == "lokr" else {}))


def train_and_compare(pack, comfy, tmp_path, caplog, family, **network):
    model = tiny_flow.build_model(family)
    dm = model.model.diffusion_model
    before = snapshot(dm)
    host = flow_host(pack, model, family)
    assert host.family_spec.name == _family_id(family) and host.schedule.prediction == "flow"
    latents = flow_latents(pack, host, family)
    cfg = train_config(pack, family, **network)
    start = grid_loss(pack, host, latents)
    result = pack("trainer.training.loop").train(host, latents, cfg, tmp_path / "run")
    with result.network.attached():
        end = grid_loss(pack, host, latents)
    assert end <= 0.8 * start, f"{family} {network}: fixed-grid flow loss {start:.4f} -> {end:.4f}"
    assert_unchanged(dm, before)

    lora_file = pack("trainer.files.lora_file")
    meta = lora_file.build_metadata(cfg, host.family, "flow", 64)
    path = lora_file.save_lora(tmp_path / "trained.safetensors", result.network.kohya_state_dict(), meta, dtype="fp32")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert all(k.startswith("lora_unet_") for k in sd)

    g = torch.Generator().manual_seed(7)
    x0 = host.scale_latents(torch.randn(1, *latents.samples[0].latent.shape, generator=g))
    item = host.encode_text(["a fixed caption"])[0]
    cond = pack("trainer.hosts.base").Conditioning(item["context"][None], None, None, [item])
    t = torch.tensor([0.6])
    noisy = host.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        base = host.predict(noisy, t, cond).float()
        with result.network.attached():
            ours = host.predict(noisy, t, cond).float()
    patches, model_lora = load_in_comfyui(comfy, model, sd, caplog)
    assert len(patches) == len(result.network)
    comfy.mm.load_models_gpu([model_lora], force_full_load=True)  # what KSampler does with the LoRA'd MODEL
    try:
        with torch.no_grad():
            theirs = host.predict(noisy, t, cond).float()
    finally:
        comfy.mm.unload_all_models()
    assert (ours - base).abs().max() > 1e-3  # the comparison below means something
    assert (ours - theirs).abs().max() <= 1e-3, f"{family}: {(ours - theirs).abs().max():.2e}"
    assert_unchanged(dm, before)


def _family_id(fixture_family: str) -> str:
    return {"sd35_medium": "sd3", "sd35_large": "sd3"}.get(fixture_family, fixture_family)


@pytest.mark.parametrize("family", ["sd3", "flux_dev"])
def test_names_are_kohyas_rule_over_kohyas_modules(pack, comfy, family):
    """kohya's lora_sd3 / lora_flux take every Linear inside DismantledBlock (its SingleDiTBlock) / Double- and
    SingleStreamBlock and name it lora_unet_ + the path with . -> _; the transformer set is exactly that."""
    model = tiny_flow.build_model(family)
    host = flow_host(pack, model, family)
    classes = {"sd3": ("DismantledBlock",), "flux_dev": ("DoubleStreamBlock", "SingleStreamBlock")}[family]
    kohya = set()
    for path, module in model.model.diffusion_model.named_modules():
        if type(module).__name__ in classes:
            for child_path, child in module.named_modules(prefix=path):
                if isinstance(child, torch.nn.Linear):
                    kohya.add("lora_unet_" + child_path.replace(".", "_"))
    ours = {t.name for t in host.adapter_targets("transformer", conv=False, text_encoder=False)}
    assert ours == kohya and len(ours) > 10
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert ours <= set(key_map)


@pytest.mark.parametrize("family", FAMILIES)
def test_target_sets_nest_and_attention_is_attention(pack, comfy, family):
    model = tiny_flow.build_model(family)
    host = flow_host(pack, model, family)
    sets = {name: {t.name for t in host.adapter_targets(name, conv=False, text_encoder=False)}
            for name in ("attention", "transformer", "full")}
    assert sets["attention"] and sets["attention"] < sets["transformer"] < sets["full"]
    assert set(sets["full"]) <= set(comfy.lora.model_lora_keys_unet(model.model, {}))
    assert not [n for n in sets["attention"] if "mlp" in n or "ffn" in n or "feed_forward" in n or "_ff_" in n]


def test_fp8_weights_train_with_the_base_unchanged(pack, comfy, tmp_path):
    """UNETLoader's weight_dtype fp8_e4m3fn: fp8 storage, fp32 compute through ComfyUI's manual cast; fp32
    adapters learn and the fp8 weights stay bit-identical."""
    model = tiny_flow.build_model("flux_dev", weight_dtype=torch.float8_e4m3fn)
    dm = model.model.diffusion_model
    assert dm.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    before = snapshot(dm)
    host = flow_host(pack, model, "flux_dev")
    latents = flow_latents(pack, host, "flux_dev")
    start = grid_loss(pack, host, latents)
    result = pack("trainer.training.loop").train(host, latents, train_config(pack, "flux_dev"), tmp_path / "run")
    assert all(p.dtype == torch.float32 for p in result.network.parameters())
    with result.network.attached():
        end = grid_loss(pack, host, latents)
    assert end <= 0.8 * start, f"fp8 flux: {start:.4f} -> {end:.4f}"
    assert_unchanged(dm, before)


def test_a_flow_run_goes_through_preflight_estimate_and_metadata(pack, comfy, tmp_path):
    """The whole Run (pre-flight, memory estimate traced on the DiT, file metadata) on Flux dev: "auto" timesteps
    are the resolution shift, min-SNR is not applied, and the file says flow / flux-1-dev."""
    model = tiny_flow.build_model("flux_dev")
    host = flow_host(pack, model, "flux_dev")
    latents = flow_latents(pack, host, "flux_dev")
    config = pack("trainer.config")
    cfg = config.TrainConfig.from_dict({"steps": 4, "batch_size": 2, "objective": {"min_snr_gamma": 5.0},
                                        "network": {"rank": 4, "alpha": 4}})
    assert cfg.objective.timestep_sampling == "auto"
    run = pack("trainer.run").Run(host, latents, cfg, run_dir=tmp_path / "run", dataset_cfg=config.DatasetConfig(),
                                  bucket_cfg=config.BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32),
                                  cache_dir=tmp_path / "cache",
                                  image_count=4)
    result = run.execute()
    assert result.outcome == "trained" and result.step == 4
    assert "flow" in result.prediction and "sampling shift 3.16" in result.prediction
    assert "token count" in result.timesteps
    assert "activations from a rough formula" not in result.estimate, result.estimate
    meta = result.metadata
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_base_model_version"] == "flux1"
    assert any("min_snr" in n for n in result.notes), result.notes


def test_a_model_too_big_for_the_gpu_is_refused_before_partial_loading(pack, comfy, monkeypatch):
    """ComfyUI would load it partially (low-VRAM offload): refused with the ways out, nothing loaded, MODEL intact."""
    model = tiny_flow.build_model("flux_dev")
    host = flow_host(pack, model, "flux_dev")
    monkeypatch.setattr(host, "device", torch.device("cuda", 0))  # what a GPU run sees; nothing reaches CUDA
    monkeypatch.setattr(host.mm, "unload_all_models", lambda: None)
    monkeypatch.setattr(host.mm, "get_free_memory", lambda *a, **k: 1024)
    loaded = []
    monkeypatch.setattr(host, "reload", lambda: loaded.append(True))
    with pytest.raises(pack("trainer.errors").TrainingError, match="partially .*fp8_e4m3fn"):
        with host.training_session():
            pass
    assert not loaded and all(p.requires_grad for p in model.model.diffusion_model.parameters())


@pytest.mark.slow  # ~1.5 min for the twelve traces; test_a_flow_run_... covers Flux in the fast set
@pytest.mark.parametrize("family", FAMILIES)
def test_the_memory_estimate_traces_each_family(pack, comfy, family):
    """The estimate runs the real DiT with the real adapters (no fallback formula) and counts its weights."""
    model = tiny_flow.build_model(family)
    host = flow_host(pack, model, family)
    cfg = train_config(pack, family)
    est = pack("trainer.preflight.memory").estimate_training_memory(host, cfg, [(64, 64)], resident_encoders=False,
                                                                     suggest=False)
    text = est.to_text()
    assert "rough formula" not in text, text
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    assert est.total > weights


@pytest.mark.parametrize("family", ["flux_dev", "sd3", "wan21"])
def test_checkpointing_recomputes_the_blocks_with_the_same_gradients(pack, comfy, family):
    model = tiny_flow.build_model(family)
    host = flow_host(pack, model, family)
    network_mod = pack("trainer.adapters.network")
    Conditioning = pack("trainer.hosts.base").Conditioning
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tiny_flow.latent_shape(family, batch=2), generator=g)
    items = host.encode_text(["one", "two"])
    cond = Conditioning(torch.stack([i["context"] for i in items]), None, None, items)
    dm = model.model.diffusion_model
    blocks = [b for name in host.family_spec.blocks for b in getattr(dm, name)]
    calls = [0]
    originals = {type(b): type(b).forward for b in blocks}  # counted at class level: the recompute calls forward

    def counting(original):
        def forward(self, *args, **kwargs):
            calls[0] += 1
            return original(self, *args, **kwargs)
        return forward

    for cls, original in originals.items():
        cls.forward = counting(original)
    grads = {}
    try:
        with torch.inference_mode(False), torch.enable_grad(), host.training_session():
            net = network_mod.LoRANetwork(host.adapter_targets("transformer", False, False),
                                          pack("trainer.config").NetworkConfig(rank=4, alpha=4),
                                          generator=torch.Generator().manual_seed(1))
            torch.nn.init.normal_(next(p for n, p in net.named_parameters() if "up" in n), std=0.1)
            for checkpointing in (False, True):
                calls[0] = 0
                net.zero_grad(set_to_none=True)
                with net.attached(), host.gradient_checkpointing(checkpointing):
                    host.predict(x, torch.tensor([0.3, 0.7]), cond).float().square().mean().backward()
                grads[checkpointing] = [p.grad.clone() for p in net.parameters() if p.grad is not None]
                grads[f"calls{checkpointing}"] = calls[0]
    finally:
        for cls, original in originals.items():
            cls.forward = original
    assert grads["callsFalse"] == len(blocks)
    assert grads["callsTrue"] == 2 * len(blocks) - 1  # every block but the last runs again in backward
    assert grads[False] and len(grads[False]) == len(grads[True])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
