"""What ComfyUI samples the MODEL with, as the engine's noise schedule.

The prediction type comes from the MODEL's ``model_sampling`` object (``get_model_object``), never from the
checkpoint's ``model_type``: a checkpoint patched with the core ModelSamplingDiscrete node (v_prediction, zsnr)
must train on v, because that is what KSampler will ask of it. Only what the engine reproduces exactly is
accepted: ComfyUI's discrete schedule with the EPS or V_PREDICTION parameterization for SD1.5/SDXL, and its two
flow samplings (CONST) for the flow families. Everything else (lcm, x0, img_to_img, EDM, Stable Cascade, a flow patch
on a UNet) is refused by name, before anything trains on the wrong target.
"""
from __future__ import annotations

import math

from ..trainer.errors import TrainingError
from ..trainer.training.schedules import DiscreteSchedule, FlowSchedule, NoiseSchedule

# Why each known patch is refused (names as ComfyUI's nodes and classes call them).
_UNSUPPORTED = {
    "LCM": "lcm (ModelSamplingDiscrete 'lcm': a distilled schedule of 50 steps)",
    "X0": "x0 (ModelSamplingDiscrete 'x0')",
    "IMG_TO_IMG": "img_to_img (ModelSamplingDiscrete 'img_to_img')",
    "EDM": "EDM (v-prediction EDM, ModelSamplingContinuousEDM)",
    "CONST": "a flow schedule this pack does not reproduce (CONST with a custom sigma / timestep mapping)",
    "COSMOS_RFLOW": "Cosmos rectified flow",
}


def _parameterization(sampling) -> str:
    import comfy.model_sampling as ms

    cls = type(sampling)
    for klass in cls.__mro__:
        if klass.__name__ in _UNSUPPORTED:
            return klass.__name__
    # Exactly ComfyUI's math, not a subclass that changes it (custom nodes subclass EPS for other objectives).
    if issubclass(cls, ms.V_PREDICTION) and cls.calculate_denoised is ms.V_PREDICTION.calculate_denoised:
        return "v"
    if (issubclass(cls, ms.EPS) and cls.calculate_denoised is ms.EPS.calculate_denoised
            and cls.calculate_input is ms.EPS.calculate_input):
        return "eps"
    return cls.__name__


def _is_plain_discrete(sampling) -> bool:
    import comfy.model_sampling as ms

    cls = type(sampling)
    return (isinstance(sampling, ms.ModelSamplingDiscrete) and not isinstance(sampling, ms.StableCascadeSampling)
            and cls.timestep is ms.ModelSamplingDiscrete.timestep and cls.sigma is ms.ModelSamplingDiscrete.sigma
            and len(sampling.sigmas) >= 2)


def _flow_shift(sampling) -> float | None:
    """The SD3-style shift of ComfyUI's two flow samplings, or None for anything else.

    ``ModelSamplingDiscreteFlow`` (SD3, Wan, Lumina2, AuraFlow, schnell) keeps the SD3 shift in ``.shift``;
    ``ModelSamplingFlux`` (Flux dev, Chroma, Qwen-Image) keeps **mu** there, and its sigma(t) is SD3's shift by
    exp(mu). Only the exact classes count: a subclass may map timesteps differently."""
    import comfy.model_sampling as ms

    cls = type(sampling)
    if not isinstance(sampling, ms.CONST) or cls.calculate_denoised is not ms.CONST.calculate_denoised:
        return None
    for base, shift in ((ms.ModelSamplingDiscreteFlow, lambda: float(sampling.shift)),
                        (ms.ModelSamplingFlux, lambda: math.exp(float(sampling.shift)))):
        if isinstance(sampling, base) and cls.timestep is base.timestep and cls.sigma is base.sigma:
            return shift()
    return None


def schedule_from_sampling(sampling, family=None) -> NoiseSchedule:
    """The engine's schedule for ComfyUI's ``model_sampling``; a TrainingError naming any patch it cannot train.
    ``family`` (trainer/families.py) says what "auto" timestep sampling means on a flow model."""
    shift = _flow_shift(sampling)
    if shift is not None:
        if family is None or family.is_unet:
            raise TrainingError("this MODEL samples with a flow schedule (a ModelSamplingSD3 / ModelSamplingFlux "
                                "patch?) but its UNet was trained on eps / v: remove that node in front of Train LoRA")
        return FlowSchedule(shift, auto_sampling=family.timesteps)
    kind = _parameterization(sampling)
    if family is not None and not family.is_unet:
        raise TrainingError(f"this {family.title} MODEL samples with {_UNSUPPORTED.get(kind, type(sampling).__name__)}"
                            ", not the flow schedule it was trained on; remove the ModelSampling node in front of "
                            "Train LoRA")
    if kind not in ("eps", "v"):
        what = _UNSUPPORTED.get(kind, f"{kind} ({type(sampling).__name__})")
        raise TrainingError(
            f"this MODEL samples with {what}, which LoRA Lab cannot train on: it trains eps- and v-prediction "
            "models. Remove the ModelSampling node in front of Train LoRA (or set it to eps / v_prediction)")
    if not _is_plain_discrete(sampling):
        raise TrainingError(
            f"this MODEL's noise schedule ({type(sampling).__name__}) is not ComfyUI's standard discrete schedule, "
            "which is the one LoRA Lab trains on; remove the node that patches model sampling in front of Train LoRA")
    return DiscreteSchedule.from_sigmas(sampling.sigmas.float().cpu(), prediction=kind)
