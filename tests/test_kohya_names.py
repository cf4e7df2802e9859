"""kohya names: SD1.5 from diffusers paths, SDXL from ldm paths, text encoders from HF-CLIP paths.

Expectations are written independently of the code under test: hand-checked diffusers -> ldm container tables for
the tiny models, and names/counts known from real kohya files (SD1.5: 192 UNet + 72 TE modules; SDXL: 722 + 264).
"""
import pytest
import torch
from torch import nn

from trainer.adapters.kohya_names import block_map, diffusers_to_ldm, ldm_to_diffusers, unet_namer
from trainer.adapters.targets import select_unet_modules, text_encoder_targets, unet_targets

# Hand-checked: where each diffusers container of the tiny models lives in the ldm/sgm UNet.
TINY_SD15_BLOCKS = {  # layers_per_block 1; down (CrossAttn, Down); up (Up, CrossAttn)
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1",
    "down_blocks.0.downsamplers.0": "input_blocks.2.0", "down_blocks.1.resnets.0": "input_blocks.3.0",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.upsamplers.0": "output_blocks.1.1",
    "up_blocks.1.resnets.0": "output_blocks.2.0", "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.resnets.1": "output_blocks.3.0", "up_blocks.1.attentions.1": "output_blocks.3.1",
}
TINY_SDXL_BLOCKS = {  # layers_per_block 2; down (Down, CrossAttn); up (CrossAttn, Up) -- real SDXL's pattern
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0": "input_blocks.3.0",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0", "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.resnets.2": "output_blocks.2.0", "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0": "output_blocks.2.2",
    "up_blocks.1.resnets.0": "output_blocks.3.0", "up_blocks.1.resnets.1": "output_blocks.4.0",
    "up_blocks.1.resnets.2": "output_blocks.5.0",
}
RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
BLOCK_TYPE = {"ResnetBlock2D": "ResBlock", "Transformer2DModel": "SpatialTransformer",
              "Downsample2D": "Downsample", "Upsample2D": "Upsample"}
TRANSFORMER_LEAVES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]

REAL_SDXL = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
REAL_SD15 = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def build_unet(config, device="cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**config)


@pytest.fixture(scope="module")
def tiny():
    from trainer.demo.tiny_models import unet_config

    torch.manual_seed(0)
    return {family: build_unet(unet_config(family)) for family in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def real_sdxl():
    return build_unet(REAL_SDXL, "meta")


def names(targets):
    return [t.name for t in targets]


def expected_transformer_names(containers_and_depths, prefix="lora_unet_"):
    out = []
    for container, depth in containers_and_depths:
        out += [f"{container}.proj_in", f"{container}.proj_out"]
        out += [f"{container}.transformer_blocks.{b}.{leaf}" for b in range(depth) for leaf in TRANSFORMER_LEAVES]
    return sorted(prefix + n.replace(".", "_") for n in out)


@pytest.mark.parametrize("family, table", [("sd15", TINY_SD15_BLOCKS), ("sdxl", TINY_SDXL_BLOCKS)])
def test_block_map_matches_the_hand_checked_table(tiny, family, table):
    assert {d: ldm for d, (ldm, _) in block_map(tiny[family].config).items()} == table


def test_tiny_sd15_uses_diffusers_paths(tiny):
    got = sorted(names(unet_targets(tiny["sd15"], "sd15", "transformer")))
    containers = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
                  "up_blocks.1.attentions.1"]
    assert got == expected_transformer_names([(c, 1) for c in containers])
    full = set(names(unet_targets(tiny["sd15"], "sd15", "full")))
    for name in ["down_blocks_0_resnets_0_conv1", "down_blocks_0_resnets_0_time_emb_proj", "mid_block_resnets_1_conv2",
                 "down_blocks_1_resnets_0_conv_shortcut", "down_blocks_0_downsamplers_0_conv",
                 "up_blocks_0_upsamplers_0_conv"]:
        assert "lora_unet_" + name in full


def test_tiny_sdxl_uses_ldm_paths(tiny):
    got = sorted(names(unet_targets(tiny["sdxl"], "sdxl", "transformer")))
    containers = ["input_blocks.4.1", "input_blocks.5.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1",
                  "output_blocks.2.1"]
    assert got == expected_transformer_names([(c, 2) for c in containers])
    attention = names(unet_targets(tiny["sdxl"], "sdxl", "attention"))
    assert len(attention) == 6 * 2 * 8 and all("_attn" in n and "ff_net" not in n for n in attention)
    full = set(names(unet_targets(tiny["sdxl"], "sdxl", "full")))
    expected = {"input_blocks_1_0_in_layers_2", "input_blocks_1_0_emb_layers_1", "input_blocks_1_0_out_layers_3",
                "input_blocks_3_0_op", "input_blocks_4_0_skip_connection", "middle_block_2_out_layers_3",
                "output_blocks_2_2_conv", "output_blocks_5_0_skip_connection"}
    assert {"lora_unet_" + n for n in expected} <= full
    assert not any("down_blocks" in n or "resnets" in n for n in full)


def test_real_sdxl_default_preset_is_kohyas_722(real_sdxl):
    got = set(names(unet_targets(real_sdxl, "sdxl", "transformer")))
    assert len(got) == 722
    for name in ["input_blocks_4_1_transformer_blocks_0_attn1_to_q", "middle_block_1_transformer_blocks_9_ff_net_2",
                 "output_blocks_5_1_proj_out", "input_blocks_7_1_transformer_blocks_9_attn2_to_k",
                 "output_blocks_0_1_transformer_blocks_0_ff_net_0_proj"]:
        assert "lora_unet_" + name in got
    assert got == set(expected_transformer_names(
        [(f"input_blocks.{i}.1", 2) for i in (4, 5)] + [(f"input_blocks.{i}.1", 10) for i in (7, 8)]
        + [("middle_block.1", 10)] + [(f"output_blocks.{i}.1", 10) for i in (0, 1, 2)]
        + [(f"output_blocks.{i}.1", 2) for i in (3, 4, 5)]))
    full = set(names(unet_targets(real_sdxl, "sdxl", "full")))
    for name in ["input_blocks_1_0_in_layers_2", "input_blocks_3_0_op", "input_blocks_6_0_op",
                 "input_blocks_4_0_skip_connection", "middle_block_0_emb_layers_1", "output_blocks_2_2_conv",
                 "output_blocks_5_2_conv", "output_blocks_8_0_out_layers_3"]:
        assert "lora_unet_" + name in full


def test_real_sd15_default_preset_is_kohyas_192():
    unet = build_unet(REAL_SD15, "meta")
    got = set(names(unet_targets(unet, "sd15", "transformer")))
    assert len(got) == 192
    for name in ["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "mid_block_attentions_0_proj_in",
                 "up_blocks_3_attentions_2_proj_out", "up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"]:
        assert "lora_unet_" + name in got


def test_text_encoder_counts_and_names_for_real_clip_configs():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
    sd15 = text_encoder_targets(clip_l, "lora_te")
    assert len(sd15) == 72 and {t.component for t in sd15} == {"te"}
    leaves = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    assert sorted(names(sd15)) == sorted(f"lora_te_text_model_encoder_layers_{i}_{leaf}"
                                         for i in range(12) for leaf in leaves)
    te1, te2 = text_encoder_targets(clip_l, "lora_te1"), text_encoder_targets(clip_g, "lora_te2")
    assert len(te1) + len(te2) == 264 and {t.component for t in te2} == {"te2"}
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names(te2)
    assert not any("projection" in n for n in names(te2))


def test_text_encoder_under_a_wrapper_path_like_comfyui():
    from transformers import CLIPTextModel

    from trainer.demo.tiny_models import text_encoder_config

    clip = CLIPTextModel(text_encoder_config())
    wrapper = nn.Module()
    wrapper.transformer = clip
    wrapper.other = nn.Linear(4, 4)
    direct = names(text_encoder_targets(clip, "lora_te1"))
    wrapped = text_encoder_targets(wrapper, "lora_te1", path_prefix="transformer")
    assert names(wrapped) == direct and len(direct) == 12
    assert direct[0].startswith("lora_te1_text_model_encoder_layers_0_")


def make_ldm_copy(unet, table):
    """An ldm-layout module tree (ComfyUI-like class names) holding the very same leaf modules as `unet`."""
    classes = {name: type(name, (nn.Module,), {}) for name in [*BLOCK_TYPE.values(), "TimestepEmbedSequential"]}

    def put(root, path, module):
        *parents, last = path.split(".")
        for part in parents:
            if not hasattr(root, part):
                root.add_module(part, nn.Module())
            root = getattr(root, part)
        root.add_module(last, module)

    root = nn.Module()
    blocks = {"input_blocks": {0: {0: unet.conv_in}}, "middle_block": {}, "output_blocks": {}}
    for diff_path, ldm_path in table.items():
        source = unet.get_submodule(diff_path)
        container = classes[BLOCK_TYPE[type(source).__name__]]()
        for inner, leaf in source.named_modules():
            if inner and not list(leaf.children()):
                inner = RESNET_INNER.get(inner, inner) if type(source).__name__ == "ResnetBlock2D" else inner
                put(container, "op" if inner == "conv" and "Downsample" in type(container).__name__ else inner, leaf)
        parts = ldm_path.split(".")
        if parts[0] == "middle_block":
            blocks["middle_block"][int(parts[1])] = container
        else:
            blocks[parts[0]].setdefault(int(parts[1]), {})[int(parts[2])] = container
    root.input_blocks, root.output_blocks = nn.ModuleList(), nn.ModuleList()
    for key in ("input_blocks", "output_blocks"):
        for index in sorted(blocks[key]):
            seq = classes["TimestepEmbedSequential"]()
            for pos in sorted(blocks[key][index]):
                seq.add_module(str(pos), blocks[key][index][pos])
            getattr(root, key).append(seq)
    root.middle_block = classes["TimestepEmbedSequential"]()
    for pos in sorted(blocks["middle_block"]):
        root.middle_block.add_module(str(pos), blocks["middle_block"][pos])
    return root


@pytest.mark.parametrize("family, table", [("sd15", TINY_SD15_BLOCKS), ("sdxl", TINY_SDXL_BLOCKS)])
@pytest.mark.parametrize("preset", ["attention", "transformer", "full"])
def test_ldm_scheme_gives_the_same_names_and_modules(tiny, family, table, preset):
    unet = tiny[family]
    ldm = make_ldm_copy(unet, table)
    from_diffusers = {t.name: t.module for t in unet_targets(unet, family, preset, scheme="diffusers")}
    from_ldm = {t.name: t.module for t in unet_targets(ldm, family, preset, scheme="ldm")}
    assert from_ldm and from_ldm.keys() == from_diffusers.keys()
    assert all(from_ldm[n] is from_diffusers[n] for n in from_ldm)


def test_comfyui_style_weight_map_is_accepted(tiny):
    unet = tiny["sd15"]
    ldm = make_ldm_copy(unet, TINY_SD15_BLOCKS)
    blocks = block_map(unet.config)
    # ComfyUI's comfy.utils.unet_to_diffusers: diffusers weight key -> ldm weight key
    comfy_map = {f"{path}.weight": f"{diffusers_to_ldm(path, blocks)}.weight"
                 for path, m in unet.named_modules() if getattr(m, "weight", None) is not None
                 and path.startswith(("down_blocks", "mid_block", "up_blocks"))}
    name_of = unet_namer("sd15", "ldm", ldm_to_diffusers_map=comfy_map)  # the map alone, no module tree
    for path, _ in select_unet_modules(ldm, "full", scheme="ldm"):
        assert name_of(path) == unet_namer("sd15", "ldm", ldm_root=ldm)(path)
    with_map = names(unet_targets(ldm, "sd15", "full", scheme="ldm", ldm_to_diffusers=comfy_map))
    assert with_map == names(unet_targets(ldm, "sd15", "full", scheme="ldm"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_ldm_round_trip_for_every_module(tiny, family):
    unet = tiny[family]
    blocks = block_map(unet.config)
    checked = 0
    for path, _ in unet.named_modules():
        try:
            ldm = diffusers_to_ldm(path, blocks)
        except KeyError:
            assert not path.startswith(("down_blocks.", "mid_block.", "up_blocks.")) or path.count(".") < 3, path
            continue
        assert ldm_to_diffusers(ldm, blocks) == path
        checked += 1
    assert checked > 100
    assert diffusers_to_ldm("time_embedding.linear_2", blocks) == "time_embed.2"
    assert diffusers_to_ldm("conv_out", blocks) == "out.2"
    if family == "sdxl":
        assert diffusers_to_ldm("add_embedding.linear_1", blocks) == "label_emb.0.0"


def test_unknown_targets_or_family_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="unknown network targets 'everything'"):
        unet_targets(tiny["sd15"], "sd15", "everything")
    with pytest.raises(ValueError, match="family 'flux'"):
        unet_targets(tiny["sd15"], "flux", "transformer")
