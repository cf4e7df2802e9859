"""The generic call of any ComfyUI diffusion transformer (SD3, Flux, Chroma, Qwen-Image, Lumina2, Wan, ...).

Nothing here is written per family: the inputs are what ComfyUI's own ``model.extra_conds(...)`` builds, per
sample, joined over the batch with the cond objects' ``concat`` where their ``can_concat`` allows it and called in
groups where it does not (what ComfyUI's sampler does; a batched call is wrong for Lumina2, whose ``num_tokens``
would count the whole batch, and for Chroma, whose guidance stays one value), and the call is ``BaseModel._apply_model``'s without the final ``calculate_denoised``: the diffusion model's
raw output, the flow velocity ``eps - x0`` in ComfyUI's CONST convention, which is the training target. What differs
between families is data in trainer/families.py (the guidance value, the blocks).
"""
from __future__ import annotations

import contextlib

import torch

from ..trainer.errors import TrainingError

EXTRA_PREFIX = "extra."  # text-cache entries the encoder returned besides cond / pooled (attention masks, ...)


def encoder_extras(output: dict) -> dict[str, torch.Tensor]:
    """The tensors of ``CLIP.encode_from_tokens(..., return_dict=True)`` other than cond / pooled, batch dim
    dropped, under :data:`EXTRA_PREFIX` names (what the family's ``extra_conds`` reads: Lumina2's / Chroma's
    ``attention_mask``, HiDream's ``conditioning_llama3``, ...)."""
    return {f"{EXTRA_PREFIX}{k}": v[0].cpu().clone() for k, v in output.items()
            if k not in ("cond", "pooled_output") and torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 1}


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """T5 / Qwen / Gemma contexts are large: kept in fp16 (what the model computes in on most GPUs), or fp32 when
    a value would not fit."""
    if not tensor.is_floating_point():
        return tensor
    half = tensor.to(torch.float16)
    return half if bool(torch.isfinite(half).all()) else tensor.float()


def sample_kwargs(base, family, item: dict, noisy: torch.Tensor) -> dict:
    """``extra_conds`` keyword arguments for one sample (batch 1) from its text-cache entry."""
    context = item["context"]
    kwargs = {"noise": noisy, "device": noisy.device, "cross_attn": context.unsqueeze(0),
              "pooled_output": item["pooled"].unsqueeze(0) if item.get("pooled") is not None else None,
              "guidance": family.guidance}
    for key, value in item.items():
        if key.startswith(EXTRA_PREFIX):
            kwargs[key[len(EXTRA_PREFIX):]] = value.unsqueeze(0)
    if "attention_mask" not in kwargs and family.needs_text_mask:
        # Lumina2 counts its text tokens from the mask (its encoder always returns one; the memory trace has none)
        kwargs["attention_mask"] = torch.ones(1, context.shape[0], dtype=torch.long, device=noisy.device)
    return kwargs


def sample_conds(base, family, noisy: torch.Tensor, items: list) -> list[dict]:
    """``extra_conds`` of each sample (batch 1), processed as ComfyUI's sampler processes them."""
    if len(items) != noisy.shape[0]:
        raise ValueError(f"{len(items)} conditionings for a batch of {noisy.shape[0]}")
    conds = []
    for i, item in enumerate(items):
        raw = base.extra_conds(**sample_kwargs(base, family, item, noisy[i:i + 1]))
        conds.append({k: v.process_cond(batch_size=1, device=noisy.device, area=None) for k, v in raw.items()})
    return conds


def concat_groups(conds: list[dict]) -> list[list[int]]:
    """Sample indices in groups that can share one call: the cond objects' own ``can_concat`` (ComfyUI's sampler
    batches conds the same way). Masks of different lengths (Chroma, Lumina2's token count) split a batch."""
    groups: list[list[int]] = []
    for i, cond in enumerate(conds):
        for group in groups:
            first = conds[group[0]]
            if set(first) == set(cond) and all(first[k].can_concat(cond[k]) for k in cond):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def predict(host, noisy: torch.Tensor, sigma: torch.Tensor, items: list) -> torch.Tensor:
    """The family's raw output (v = eps - x0) at the noisy latent, in ``host.dtype``."""
    conds = sample_conds(host.base, host.family_spec, noisy, items)
    groups = concat_groups(conds)
    if len(groups) == 1:
        return _call(host, noisy, sigma, conds)
    out = [None] * noisy.shape[0]
    for group in groups:
        index = torch.tensor(group, device=noisy.device)
        result = _call(host, noisy.index_select(0, index), sigma.index_select(0, index), [conds[i] for i in group])
        for row, i in enumerate(group):
            out[i] = result[row:row + 1]
    return torch.cat(out)


def _call(host, noisy: torch.Tensor, sigma: torch.Tensor, conds: list[dict]) -> torch.Tensor:
    """``BaseModel._apply_model`` for one concatenable group, without the final ``calculate_denoised``."""
    base, dtype = host.base, host.dtype
    kw = {k: conds[0][k].concat([c[k] for c in conds[1:]]) for k in conds[0]}
    if "c_concat" in kw:
        raise TrainingError(f"this {host.family_spec.title} MODEL takes an image or mask input besides the noise "
                            "(inpainting / Fill / image-to-video): LoRA Lab trains text-to-image models only")
    context = kw.pop("c_crossattn")
    xc = host.sampling.calculate_input(sigma, noisy).to(dtype)
    for key, value in kw.items():
        if torch.is_tensor(value):
            kw[key] = value.to(noisy.device, dtype if value.is_floating_point() else None)
    t = base.process_timestep(host.sampling.timestep(sigma).float(), x=noisy, **kw)
    return base.diffusion_model(xc, t, context=context.to(noisy.device, dtype), control=None,
                                transformer_options={}, **kw)


def rows_as_items(cond, batch: int) -> list:
    """Per-sample entries from a batched Conditioning's rows (the memory trace builds those)."""
    items = []
    for i in range(batch):
        item = {"context": cond.context[i]}
        if cond.pooled is not None:
            item["pooled"] = cond.pooled[i]
        items.append(item)
    return items


def _clone_tensors(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_clone_tensors(v) for v in value)
    return value


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model, block_lists):
    """Non-reentrant gradient checkpointing of every block in the named ModuleLists, undone on exit.

    The blocks' tensor inputs are cloned *inside* the checkpointed function: Flux-style blocks add residuals in
    place onto their inputs, so a clone outside would be mutated before the recompute reads it. The last block is
    left alone (its recompute would come first thing in backward and save nothing)."""
    from torch.utils.checkpoint import checkpoint

    blocks = [b for name in block_lists for b in (getattr(diffusion_model, name, None) or [])][:-1]
    try:
        for block in blocks:
            def forward(*args, _original=block.forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)

                def run(*a, **k):
                    return _original(*_clone_tensors(a), **{n: _clone_tensors(v) for n, v in k.items()})

                return checkpoint(run, *args, use_reentrant=False, **kwargs)

            block.forward = forward  # an instance attribute: deleting it restores the class method
        yield blocks
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
