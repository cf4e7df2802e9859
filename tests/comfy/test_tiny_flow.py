"""The tiny flow / DiT fixtures (tiny_flow.py) are faithful stand-ins: each family builds as ComfyUI's own classes,
the generic call reproduces ComfyUI's apply_model, training-style backward passes work (with the LayerNorm-copy fix
exactly where the family needs it), and the LoRA names cover every block Linear."""
from __future__ import annotations

import contextlib

import pytest

try:
    from . import tiny_flow
except ImportError:
    import tiny_flow  # type: ignore[no-redef]

FAMILIES = list(tiny_flow.FAMILIES)
# Prompt length the tiny encoders give for a short caption: padded to a fixed minimum, or the caption's own length.
# One family per encoder kind (flux_schnell shares Flux's, wan22_5b Wan's, sd35_* SD3's).
TEXT_TOKENS = {"sd3": 77, "flux_dev": 256, "chroma": "unpadded", "lumina2": "unpadded", "wan21": 512, "auraflow": 256}

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def flow_model(comfy):
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_flow.build_model(family)
        return cache[family]

    return get


def _sampling_class(comfy, spec):
    ms = comfy.model_sampling
    return ms.ModelSamplingFlux if spec.sampling == "flux" else ms.ModelSamplingDiscreteFlow


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_comfyui_classes(comfy, flow_model, family):
    import torch

    spec = tiny_flow.FAMILIES[family]
    model = flow_model(family)
    base = model.model
    assert type(base) is getattr(comfy.model_base, spec.model_class)
    assert type(base.model_config).__name__ == spec.config_class
    assert base.model_type.name == spec.model_type
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, _sampling_class(comfy, spec)) and isinstance(ms, comfy.model_sampling.CONST)
    assert ms.shift == pytest.approx(spec.shift)
    if spec.multiplier is not None:
        assert ms.multiplier == pytest.approx(spec.multiplier)
    params = dict(base.diffusion_model.named_parameters())
    assert sum(p.numel() for p in params.values()) < 2_100_000
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert all(torch.isfinite(b).all() for b in base.diffusion_model.buffers())

    fmt = base.latent_format
    shape = tiny_flow.latent_shape(family, 2)
    assert fmt.latent_channels == spec.latent_channels and len(shape) == 2 + (fmt.latent_dimensions or 2)
    assert base.process_latent_in(torch.randn(shape)).shape == shape

    dm = base.diffusion_model
    for name in spec.block_lists:
        blocks = getattr(dm, name)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) >= 1
        assert {type(b).__name__ for b in blocks} <= set(spec.block_classes)
    unlisted = [n for n, m in dm.named_children() if isinstance(m, torch.nn.ModuleList) and n not in spec.block_lists
                and any(type(b).__name__ in spec.block_classes for b in m)]
    assert unlisted == []

    again = tiny_flow.build_model(family)  # fixed seed: bit-identical weights
    other = again.model.diffusion_model.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in dm.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_call_equals_apply_model(comfy, flow_model, family):
    import torch

    model = flow_model(family)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tiny_flow.latent_shape(family, 2), generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    cond = tiny_flow.conditioning(family, batch=2, seed=2)
    inputs = tiny_flow.model_inputs(model.model, x, cond)
    assert set(inputs) == set(tiny_flow.FAMILIES[family].model_keys)
    assert inputs["c_crossattn"].shape == (2, 8, tiny_flow.FAMILIES[family].context_width)
    with torch.no_grad():
        v = tiny_flow.predict(model, x, sigma, cond)
        x0 = tiny_flow.apply_model(model, x, sigma, cond)
        assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 1e-2
        s = sigma.view((-1,) + (1,) * (x.ndim - 1))
        torch.testing.assert_close(x - s * v, x0, rtol=1e-5, atol=1e-5)  # CONST: x0 = x_t - sigma * v
        # joining per-sample conditionings is the same as running each sample alone
        first = tiny_flow.predict(model, x[:1], sigma[:1], cond[:1])
        torch.testing.assert_close(v[:1], first, rtol=1e-4, atol=1e-5)
        # the output reads the conditioning and the noise level
        other = tiny_flow.conditioning(family, batch=1, seed=3)
        assert (tiny_flow.predict(model, x[:1], sigma[:1], other) - first).abs().mean() > 1e-4
        assert (tiny_flow.predict(model, x[:1], sigma[1:], cond[:1]) - first).abs().mean() > 1e-4


def _lora_like_deltas(base, family):
    """A rank-2 additive delta (B @ A) on the first Linear of every block, as a LoRA forward hook would add."""
    import torch

    gen = torch.Generator().manual_seed(4)
    dm = base.diffusion_model
    adapters, handles = [], []
    for list_name in tiny_flow.FAMILIES[family].block_lists:
        for block in getattr(dm, list_name):
            linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
            a = (0.1 * torch.randn(2, linear.in_features, generator=gen)).requires_grad_()
            b = (0.1 * torch.randn(linear.out_features, 2, generator=gen)).requires_grad_()

            def hook(module, args, out, a=a, b=b):
                return out + args[0] @ a.t() @ b.t()

            adapters.append((a, b))
            handles.append(linear.register_forward_hook(hook))
    return adapters, handles


def _loss_and_grads(model, family, fix_norms: bool, checkpoint: bool = False):
    import torch

    base = model.model
    dm = base.diffusion_model
    spec = tiny_flow.FAMILIES[family]
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(tiny_flow.latent_shape(family, 2), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    sigma = torch.tensor([0.4, 0.7])
    s = sigma.view((-1,) + (1,) * (x0.ndim - 1))
    xt = (1 - s) * x0 + s * eps
    adapters, handles = _lora_like_deltas(base, family)
    dm.requires_grad_(False)
    try:
        with contextlib.ExitStack() as stack:
            if fix_norms:
                stack.enter_context(tiny_flow.norms_on_copies(dm))
            if checkpoint:
                stack.enter_context(tiny_flow.checkpointed_blocks(dm, spec.block_lists))
            v = tiny_flow.predict(model, xt, sigma, tiny_flow.conditioning(family, batch=2))
            loss = (v - (eps - x0)).pow(2).mean()
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        dm.requires_grad_(True)
    return loss.detach(), [t.grad for pair in adapters for t in pair]


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_through_blocks(comfy, flow_model, family):
    import torch

    model = flow_model(family)
    spec = tiny_flow.FAMILIES[family]
    if spec.needs_norm_copies:
        with pytest.raises(RuntimeError, match="inplace operation"):
            _loss_and_grads(model, family, fix_norms=False)
    loss, grads = _loss_and_grads(model, family, fix_norms=spec.needs_norm_copies)
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # per-block checkpointing over the listed blocks gives the same loss and gradients
    loss_ck, grads_ck = _loss_and_grads(model, family, fix_norms=spec.needs_norm_copies, checkpoint=True)
    torch.testing.assert_close(loss_ck, loss)
    for g, g_ck in zip(grads, grads_ck):
        torch.testing.assert_close(g_ck, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_names_cover_block_linears(comfy, flow_model, family):
    base = flow_model(family).model
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    linears = tiny_flow.block_linears(base, family)
    assert len(linears) >= 10
    names = {"lora_unet_" + path.replace(".", "_"): path for path, _ in linears}
    assert len(names) == len(linears)  # flattening creates no collisions
    missing = {n: p for n, p in names.items() if key_map.get(n) != f"diffusion_model.{p}.weight"}
    assert missing == {}


def test_fp8_weights_compute_in_fp32(comfy):
    import torch

    model = tiny_flow.build_model("flux_dev", weight_dtype=torch.float8_e4m3fn)
    base = model.model
    assert {p.dtype for p in base.diffusion_model.parameters()} == {torch.float8_e4m3fn}
    assert base.manual_cast_dtype == torch.float32
    x = torch.randn(tiny_flow.latent_shape("flux_dev", 1))
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        v8 = tiny_flow.predict(model, x, sigma, tiny_flow.conditioning("flux_dev"))
        v32 = tiny_flow.predict(tiny_flow.build_model("flux_dev"), x, sigma, tiny_flow.conditioning("flux_dev"))
    assert v8.dtype == torch.float32 and torch.isfinite(v8).all()
    assert (v8 - v32).norm() < 0.2 * v32.norm()  # the same model, rounded to fp8


@pytest.mark.parametrize("family", list(TEXT_TOKENS))
def test_tiny_text_encoder_feeds_the_model(comfy, flow_model, family):
    import torch

    spec = tiny_flow.FAMILIES[family]
    clip = tiny_flow.build_text_encoder(family)
    enc = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True, return_dict=True)
    other = clip.encode_from_tokens(clip.tokenize("a red house by the river"), return_pooled=True, return_dict=True)
    cond = enc.pop("cond")
    assert cond.ndim == 3 and cond.shape[0] == 1 and cond.shape[2] == spec.context_width
    tokens = TEXT_TOKENS[family]
    assert cond.shape[1] == tokens if tokens != "unpadded" else 4 <= cond.shape[1] < 32
    assert torch.isfinite(cond).all()
    assert cond.shape != other["cond"].shape or (cond - other["cond"]).abs().mean() > 1e-4
    pooled = enc.pop("pooled_output", None)
    if spec.pooled_width:
        assert pooled.shape == (1, spec.pooled_width)
    kwargs = {"cross_attn": cond}
    if spec.pooled_width or spec.needs_pooled_key:
        kwargs["pooled_output"] = pooled
    if spec.guidance != "absent":
        kwargs["guidance"] = spec.guidance
    if "attention_mask" in enc:
        kwargs["attention_mask"] = enc["attention_mask"]
    model = flow_model(family)
    with torch.no_grad():
        v = tiny_flow.predict(model, torch.randn(tiny_flow.latent_shape(family, 1)), torch.tensor([0.5]), [kwargs])
    assert torch.isfinite(v).all()


def test_flux_text_encoder_through_load_text_encoder_state_dicts(comfy):
    import torch

    clip = tiny_flow.build_flux_text_encoder_from_files()
    assert type(clip.cond_stage_model).__name__.startswith("FluxClipModel")
    enc = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True, return_dict=True)
    assert enc["cond"].shape == (1, 256, tiny_flow.TEXT_WIDTH)  # T5 pads Flux prompts to 256 tokens
    assert enc["pooled_output"].shape == (1, tiny_flow.POOLED_WIDTH) and torch.isfinite(enc["cond"]).all()


def test_taesd16_vae(comfy):
    import torch

    vae = tiny_flow.build_taesd16_vae()
    latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert latent.shape == (1, 16, 8, 8) and torch.isfinite(latent).all()
    assert vae.decode(latent).shape == (1, 64, 64, 3)


def test_sd3_checkpoint_loads_through_the_stock_loader(comfy, flow_model, tmp_path_factory):
    import torch

    path = tiny_flow.build_sd3_checkpoint(tmp_path_factory.mktemp("sd3") / "tiny_sd35_medium.ckpt")
    assert path.stat().st_size < 40e6  # full-size CLIP-L/G stored as views
    te_options = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3}}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                                te_model_options=te_options)
    base = model.model
    assert type(base) is comfy.model_base.SD3 and type(base.model_config).__name__ == "SD3"
    config = {k: v for k, v in base.model_config.unet_config.items() if k != "dtype"}
    assert config == tiny_flow.FAMILIES["sd35_medium"].unet_config  # detection recovers the tiny layout
    ref = flow_model("sd35_medium").model.diffusion_model.state_dict()
    loaded = base.diffusion_model.state_dict()
    assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert vae.encode(torch.rand(1, 64, 64, 3)).shape == (1, 16, 8, 8)

    enc = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True, return_dict=True)
    assert enc["cond"].shape == (1, 77, 4096) and enc["pooled_output"].shape == (1, 2048)  # CLIP-L/G, no T5
    cond = [{"cross_attn": enc["cond"], "pooled_output": enc["pooled_output"]}]
    with torch.no_grad():
        v = tiny_flow.predict(model, torch.randn(1, 16, 8, 8), torch.tensor([0.5]), cond)
    assert torch.isfinite(v).all()
