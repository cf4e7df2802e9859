"""A low-variance progress measure for tests: the mean loss over every sample at fixed timesteps and fixed noise."""
from __future__ import annotations

import torch

from trainer.config import DatasetConfig, TrainConfig
from trainer.data.text import TextEmbeddings
from trainer.training.loop import SampleRng, collate, compute_loss


@torch.no_grad()
def fixed_grid_loss(host, latents, cfg: TrainConfig, timesteps: list, seed: int = 1234) -> float:
    text = TextEmbeddings(host, cfg.clip_skip, None, trainable=False)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for sample in latents.samples:
        _, cond = collate(host, [sample], text, DatasetConfig(), [SampleRng.keyed(seed)], host.device)
        torch.rand(1, generator=generator)  # keeps the grid's noise the one the tests' thresholds were measured on
        x0 = host.scale_latents(sample.latent.unsqueeze(0).to(host.device, torch.float32))
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            ts = torch.full((1,), t, dtype=torch.long, device=x0.device)
            total += float(compute_loss(host, x0, cond, cfg, generator, timesteps=ts, noise=noise))
            count += 1
    return total / max(count, 1)
