"""What ComfyUI samples the MODEL with, as the engine's noise schedule.

The prediction type comes from the MODEL's ``model_sampling`` object (``get_model_object``), never from the
checkpoint's ``model_type``: a checkpoint patched with the core ModelSamplingDiscrete node (v_prediction, zsnr)
must train on v, because that is what KSampler will ask of it. Only what the engine reproduces exactly is
accepted: ComfyUI's discrete schedule with the EPS or V_PREDICTION parameterization. Everything else (lcm, x0,
img_to_img, EDM, Stable Cascade, flow) is refused by name, before anything trains on the wrong target.
"""
from __future__ import annotations

from ..trainer.errors import TrainingError
from ..trainer.training.schedules import DiscreteSchedule

# Why each known patch is refused (names as ComfyUI's nodes and classes call them).
_UNSUPPORTED = {
    "LCM": "lcm (ModelSamplingDiscrete 'lcm': a distilled schedule of 50 steps)",
    "X0": "x0 (ModelSamplingDiscrete 'x0')",
    "IMG_TO_IMG": "img_to_img (ModelSamplingDiscrete 'img_to_img')",
    "EDM": "EDM (v-prediction EDM, ModelSamplingContinuousEDM)",
    "CONST": "flow (CONST, e.g. ModelSamplingSD3 / ModelSamplingFlux)",
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


def schedule_from_sampling(sampling) -> DiscreteSchedule:
    """The engine's schedule for ComfyUI's ``model_sampling``; a TrainingError naming any patch it cannot train."""
    kind = _parameterization(sampling)
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
