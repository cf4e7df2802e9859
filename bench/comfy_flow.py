"""The flow row of bench/comfy_step.py: seconds per step on a tiny Flux.1 dev, ours vs ComfyUI's built-in Train LoRA.

Both sides train rank-8 LoRAs on the same tiny random-weight Flux dev MODEL (tests/comfy/tiny_flow.py: ComfyUI's own
`model_base.Flux`, ModelSamplingFlux), the same 8 latents (16x16x16, i.e. 128 px images), the same captions through
the same tiny Flux text encoder (T5 + CLIP-L), batch 1, AdamW, gradient checkpointing on, fp32, CPU:

* ours      `trainer.training.loop.train` through `ComfyHost` (the generic DiT path, nodes/dit.py), targets
            "transformer" (every Linear in the double and single blocks) plus a "full" line (every Linear of the
            model: the fair side, as the built-in adapts every layer that has a weight), under inference_mode.
* builtin   `comfy_extras.nodes_train.TrainLoraNode().train(...)` with the same settings, timed per optimizer step.
* floor     forward + backward + fused AdamW of the diffusion model with ours "full" adapters, no checkpointing;
            "floor + checkpointing" the same inside ComfyHost.gradient_checkpointing(True) (the recompute alone).

Each side gets its own copy of the MODEL (the built-in leaves wrappers on its modules). Imported by
bench/comfy_step.py, which prints its figures and the last line `flow_ours_over_builtin: <ratio>` (ours "full" /
built-in; goal <= 0.6).
"""
from __future__ import annotations

import time
from pathlib import Path

IMAGES, LATENT_SIDE, RANK, LR = 8, 16, 8, 5e-4


def _pack(name: str):
    import importlib

    return importlib.import_module(f"loralab_pack.{name}")


class FlowBench:
    def __init__(self, tmp: Path, now, per_step, warmup: int, timed: int):
        import tiny_flow
        import torch

        self.tmp, self.now, self.per_step, self.warmup, self.timed = tmp, now, per_step, warmup, timed
        # Built outside inference_mode: the built-in cannot train on inference tensors (its RMSNorm scales would
        # be saved for backward), which is what a CPU load under inference_mode gives. Ours handles both.
        self.model = tiny_flow.build_model("flux_dev")
        self.builtin_model = tiny_flow.build_model("flux_dev")
        self.clip = tiny_flow.build_text_encoder("flux_dev")
        cache = _pack("trainer.data.cache")
        g = torch.Generator().manual_seed(0)
        self.captions = [f"a tiny test image number {i}, flat colours" for i in range(IMAGES)]
        latents = [torch.randn(16, LATENT_SIDE, LATENT_SIDE, generator=g) for _ in range(IMAGES)]
        px = LATENT_SIDE * 8
        self.latents = cache.LatentSet([cache.LatentSample(lat, None, cap, 1, (px, px), px, (px, px), (0, 0), None,
                                                           f"mem://{i}")
                                        for i, (lat, cap) in enumerate(zip(latents, self.captions))], report=None)
        with torch.inference_mode():
            self.latent_dict = {"samples": torch.stack(latents)}
            self.positive = [self.clip.encode_from_tokens_scheduled(self.clip.tokenize(c))[0] for c in self.captions]
        self.runs = 0

    def params(self) -> float:
        return sum(p.numel() for p in self.model.model.diffusion_model.parameters()) / 1e6

    def config(self, targets: str, steps: int):
        return _pack("trainer.config").TrainConfig.from_dict({
            "steps": steps, "batch_size": 1, "seed": 0, "save_every": 0, "gradient_checkpointing": True,
            "network": {"rank": RANK, "alpha": RANK, "targets": targets},
            "optimizer": {"name": "adamw", "learning_rate": LR, "scheduler": "constant"}})

    def ours(self, targets: str):
        import torch

        steps = self.warmup + self.timed
        self.runs += 1
        host = _pack("nodes.comfy_host").ComfyHost(self.model.clone(), self.clip)
        stamps = []
        loop = _pack("trainer.training.loop")
        with torch.inference_mode():
            loop.train(host, self.latents, self.config(targets, steps), self.tmp / f"flow{self.runs:02d}",
                       text_cache_dir=self.tmp / "flow_text", hooks=loop.Hooks(on_step=lambda *a: stamps.append(self.now())))
        return self.per_step(stamps)

    def builtin(self):
        from comfy_step import run_builtin

        stamps = run_builtin(self.builtin_model, self.latent_dict, self.positive, self.warmup + self.timed, RANK, LR)
        return self.per_step(stamps)

    def floor(self, checkpointing: bool = False):
        import torch

        host = _pack("nodes.comfy_host").ComfyHost(self.model.clone(), self.clip)
        network_mod = _pack("trainer.adapters.network")
        cfg = self.config("full", 1)
        items = host.encode_text(self.captions[:1])
        cond = _pack("trainer.hosts.base").Conditioning(items[0]["context"][None].float(), None, None, items)
        stamps = []
        with torch.inference_mode(False), torch.enable_grad(), host.training_session():
            network = network_mod.LoRANetwork(host.adapter_targets("full", False, False), cfg.network,
                                              device=host.device, generator=torch.Generator().manual_seed(0))
            optimizer = torch.optim.AdamW(network.parameters(), lr=LR, fused=True)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, 16, LATENT_SIDE, LATENT_SIDE, generator=gen)
            target = torch.randn(x.shape, generator=gen)
            with network.attached(), host.gradient_checkpointing(checkpointing):
                for _ in range(self.warmup + self.timed):
                    out = host.predict(x, torch.rand(1, generator=gen), cond)
                    torch.nn.functional.mse_loss(out, target).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stamps.append(self.now())
        return self.per_step(stamps)


def flow_rows(tmp: Path, now, per_step, warmup: int, timed: int, rounds: int) -> float:
    """Run the flow sides for ``rounds`` rotating rounds, print the table, return ours full / built-in."""
    import statistics

    t0 = time.perf_counter()
    bench = FlowBench(tmp, now, per_step, warmup, timed)
    print(f"\ntiny Flux.1 dev ({bench.params():.2f} M params), {IMAGES} latents 16x{LATENT_SIDE}x{LATENT_SIDE} "
          f"(128 px), batch 1, rank {RANK}, AdamW lr {LR}, fp32, gradient checkpointing on")
    sides = {"floor": bench.floor, "ours_full": lambda: bench.ours("full"), "builtin": bench.builtin,
             "floor_ckpt": lambda: bench.floor(checkpointing=True), "ours_transformer": lambda: bench.ours("transformer")}
    results = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            results[name].append(sides[name]())
        print(f"flow round {r + 1} (wall ms/step): " + ", ".join(f"{n} {results[n][-1][0] * 1000:.0f}"
                                                               for n in order), flush=True)
    wall = {name: statistics.median(v[0] for v in runs) for name, runs in results.items()}
    floor = wall["floor"]
    labels = {"floor": "flow floor: fwd+bwd+AdamW, full adapters", "ours_full": "flow ours, targets full (fair)",
              "floor_ckpt": "flow floor + ComfyHost.gradient_checkpointing",
              "ours_transformer": "flow ours, targets transformer", "builtin": "flow built-in TrainLoraNode"}
    for name in ("floor", "floor_ckpt", "ours_full", "ours_transformer", "builtin"):
        print(f"{labels[name]:<44}{wall[name]:>9.4f}{wall[name] / floor:>9.2f}")
    print(f"flow bench time {time.perf_counter() - t0:.0f} s")
    return wall["ours_full"] / wall["builtin"]
