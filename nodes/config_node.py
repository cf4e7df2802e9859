"""Configure LoRA: every training setting in one node, with presets for common cases."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer import choices
from .types import CATEGORY, Latents, TrainConfig


def _lora_files() -> list[str]:
    """'none' and the LoRA files ComfyUI lists (models/loras and extra paths), as LoraLoader shows them."""
    import folder_paths

    return ["none"] + [f for f in folder_paths.get_filename_list("loras") if f.lower().endswith(".safetensors")]


class ConfigureLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_ConfigureLoRA",
            display_name="Configure LoRA (LoRA Lab)",
            category=f"{CATEGORY}/train",
            description="Adapter, optimizer, schedule, objective and precision settings for Train LoRA. "
                        "A preset other than 'custom' overrides the settings it names (shown in the summary). "
                        "Connect the MODEL and latents too to see the memory estimate here before training.",
            inputs=[
                io.Combo.Input("preset", options=list(choices.PRESETS), default="custom",
                               tooltip="character: rank 16, transformer blocks, cosine, min-SNR 5. style: rank 32 "
                               "+ conv layers. low memory: rank 8 attention-only, Adafactor, checkpointing. "
                               "custom: exactly the values below."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank (dim). Higher learns more detail "
                             "and makes a bigger file. 8-32 is typical."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5, tooltip="Scale = alpha / "
                               "rank. alpha = rank gives scale 1 (our default); kohya's alpha 1 means scale 1/rank, "
                               "which needs a proportionally higher learning rate."),
                io.Float.Input("dropout", default=0.0, min=0.0, max=0.9, step=0.05,
                               tooltip="Dropout on the LoRA input during training (regularisation). 0 is usual."),
                io.Combo.Input("targets", options=list(choices.TARGET_SETS), default="transformer",
                               tooltip="attention: q/k/v/out only. transformer: every linear in transformer blocks "
                               "(kohya's default; for SD3, Flux and the other DiTs every linear of their blocks). "
                               "full: also resnet and up/down-sampling convs (LoCon; DiTs: every linear)."),
                io.Int.Input("conv_rank", default=0, min=0, max=256, tooltip="Rank of the 3x3 conv adapters used by "
                             "'full'. 0 = same as rank."),
                io.Combo.Input("algorithm", options=list(choices.ALGORITHMS), default="lora",
                               tooltip="The adapter each layer gets. lora: the default, smallest and fastest. loha "
                               "(LyCORIS LoHa): two low-rank pairs multiplied element-wise, more capacity per "
                               "parameter, for styles. lokr (LyCORIS LoKr): a Kronecker product, tiny files; "
                               "lokr_factor / lokr_full_matrix shape it. dora: LoRA plus a trained magnitude per "
                               "input channel, often closer to a full fine-tune. All load in stock LoraLoader."),
                io.Int.Input("lokr_factor", default=-1, min=-1, max=256, tooltip="LoKr only: size of the small "
                             "Kronecker factor of each layer (8 or 16 make it small and the large one big). -1: the "
                             "most balanced split (e.g. 1280 = 32 x 40)."),
                io.Boolean.Input("lokr_full_matrix", default=False, tooltip="LoKr only: the large Kronecker factor "
                                 "as one full matrix instead of a rank-'rank' pair (rank and alpha are then unused; "
                                 "with lokr_factor 8-16 this is LyCORIS's popular full-matrix LoKr)."),
                io.Combo.Input("optimizer", options=list(choices.OPTIMIZERS), default="adamw", tooltip="adamw: reliable default. "
                               "adamw8bit / lion8bit: less memory, need bitsandbytes and a CUDA GPU. adafactor: "
                               "smallest state, works everywhere. sgd: plain momentum."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-5, round=False,
                               tooltip="Peak learning rate for the UNet / diffusion-model adapters. 1e-4 for AdamW at "
                               "alpha = rank."),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=1.0, step=1e-5, round=False,
                               tooltip="Learning rate for text-encoder adapters. 0 = same as learning_rate."),
                io.Float.Input("loraplus_lr_ratio", default=0.0, min=0.0, max=64.0, step=1.0,
                               tooltip="LoRA+: the up/B factors (LoHa: hada_w1_a/w2_a, LoKr: lokr_w2_a) train at "
                               "learning_rate x this. 16 is the usual value, with a lower learning_rate; 0 = off."),
                io.Combo.Input("scheduler", options=list(choices.SCHEDULERS), default="constant_with_warmup",
                               tooltip="How the learning rate changes over the run (after warmup)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Steps to ramp the learning rate up from 0."),
                io.Float.Input("weight_decay", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="Decoupled weight decay (AdamW, Lion, SGD)."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Clip the gradient norm to this. 0 disables clipping."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimizer step: effective batch = batch size x this."),
                io.Combo.Input("loss", options=list(choices.LOSSES), default="mse",
                               tooltip="Loss on the model's own prediction (eps / v). Huber is robust to outliers."),
                io.Combo.Input("timestep_sampling", options=list(choices.TIMESTEP_SAMPLINGS), default="auto",
                               tooltip="Which noise levels to train on. auto: the model family's own recipe "
                               "(SD1.5/SDXL uniform; SD3, Wan, Lumina2 shifted by the model's shift; Flux, Chroma, "
                               "Qwen-Image flux_shift). uniform: all equally. logit_normal: more mid-range. shifted: "
                               "more high noise (flow models). flux_shift: shifted by the image's size (flow models)."),
                io.Float.Input("min_snr_gamma", default=5.0, min=0.0, max=20.0, step=0.5,
                               tooltip="Min-SNR-gamma loss weighting (5 is standard; 0 turns it off). Stabilises "
                               "training by down-weighting easy low-noise steps. eps / v models only: flow models "
                               "(SD3, Flux, ...) shape the noise levels with timestep_sampling instead, unweighted."),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=0.5, step=0.01,
                               tooltip="Adds a per-channel offset to the noise so the LoRA can learn very dark or "
                               "bright images. 0.05-0.1 if you need that; 0 otherwise."),
                io.Combo.Input("mixed_precision", options=list(choices.MIXED_PRECISIONS), default="auto",
                               tooltip="auto (recommended): decided from the model's weights. fp16 weights (ComfyUI's "
                               "default on NVIDIA GPUs) train with fp16 autocast and a gradient scaler, so small "
                               "gradients do not vanish; bf16 / fp32 weights compute in their own dtype. bf16 / fp16: "
                               "autocast to that dtype (over weights of another dtype this keeps a cast copy). no: "
                               "the weights' dtype without autocast. Adapters always stay fp32; Train LoRA says what "
                               "it used."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute activations in the "
                                 "backward pass: much less memory, about 30% slower."),
                io.Boolean.Input("train_text_encoder", default=False, tooltip="Also train adapters on the text "
                                 "encoder(s); Train LoRA's CLIP output and the saved file carry them. Usually off for "
                                 "SD1.5/SDXL; lower text_encoder_lr when on. SD1.5/SDXL only (not T5, Qwen, Gemma)."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001, round=False,
                               tooltip="Keep an exponential moving average of the adapter weights (e.g. 0.999) and "
                               "save it as a second file. 0 disables."),
                io.Int.Input("clip_skip", default=1, min=1, max=12,
                             tooltip="Text-encoder layer to train on, as in your generation graph: 1 = no 'CLIP Set "
                             "Last Layer' node (SD1.5: last layer; SDXL: already the penultimate), N = that node at "
                             "-N. 2 for many SD1.5 anime models; on SDXL 1 and 2 are the same."),
                io.Combo.Input("continue_from", options=_lora_files(), default="none", optional=True,
                               tooltip="Start from an existing LoRA in models/loras instead of from scratch (its "
                               "rank and alpha are kept; algorithm, targets and text-encoder setting must match it). 'none': "
                               "a fresh LoRA."),
                io.Model.Input("model", optional=True, tooltip="Optional, for the memory estimate only: the MODEL "
                               "you will train. With latents connected too, this node shows what training needs "
                               "at batch sizes 1, 2, 4 and 8 against free memory, and what to change if it does "
                               "not fit."),
                Latents.Input("latents", optional=True, tooltip="Optional, for the memory estimate only: from "
                              "Bucket & Cache Latents (the largest bucket sets the estimate)."),
            ],
            outputs=[TrainConfig.Output(display_name="config"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, preset, rank, alpha, dropout, targets, conv_rank, optimizer, learning_rate, text_encoder_lr,
                scheduler, warmup_steps, weight_decay, max_grad_norm, grad_accumulation, loss, timestep_sampling,
                min_snr_gamma, noise_offset, mixed_precision, gradient_checkpointing, train_text_encoder,
                ema_decay, clip_skip, algorithm="lora", lokr_factor=-1, lokr_full_matrix=False,
                loraplus_lr_ratio=0.0, continue_from="none", model=None, latents=None) -> io.NodeOutput:
        from ..trainer.config import NetworkConfig, ObjectiveConfig, OptimizerConfig
        from ..trainer.config import TrainConfig as Config
        from ..trainer.presets import apply_preset, describe

        init_from = ""
        if continue_from and continue_from != "none":
            import folder_paths

            init_from = folder_paths.get_full_path("loras", continue_from) or ""
            if not init_from:
                raise ValueError(f"Configure LoRA: continue_from '{continue_from}' is not in models/loras any more; "
                                 "refresh the node list (press R) and pick another, or choose 'none'")
        config = Config(
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, ema_decay=ema_decay,
            clip_skip=clip_skip,
            network=NetworkConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, conv_rank=conv_rank,
                                  conv_alpha=alpha if conv_rank == 0 else min(alpha, float(conv_rank)),
                                  train_text_encoder=train_text_encoder, init_from=init_from, algorithm=algorithm,
                                  lokr_factor=lokr_factor, lokr_full_matrix=lokr_full_matrix),
            optimizer=OptimizerConfig(name=optimizer, learning_rate=learning_rate,
                                      text_encoder_lr=text_encoder_lr or None, weight_decay=weight_decay,
                                      scheduler=scheduler, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                                      grad_accumulation=grad_accumulation, loraplus_lr_ratio=loraplus_lr_ratio),
            objective=ObjectiveConfig(loss=loss, timestep_sampling=timestep_sampling, min_snr_gamma=min_snr_gamma,
                                      noise_offset=noise_offset),
        )
        config = apply_preset(config, preset)
        summary = describe(config)
        if model is not None or latents is not None:
            from .estimate import configure_estimate_text

            summary += "\n\n" + configure_estimate_text(model, latents, config)
        return io.NodeOutput(config, summary, ui=ui.PreviewText(summary))
