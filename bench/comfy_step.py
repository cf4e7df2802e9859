"""Seconds per optimizer step inside ComfyUI: our engine vs ComfyUI's built-in Train LoRA vs the bare floor.

All three train rank-8 LoRAs on the same tiny SD1.5 checkpoint (ComfyUI's own loader, CPU, fp32), the same cached
latents of 8 real PNG images (one bucket), batch 1, AdamW, lr 5e-4:

* ours      `trainer.loop.train` through `ComfyHost`, wired as the Train LoRA node wires it (RunLog, progress
            reporter, interrupt check + ComfyUI ProgressBar in on_step), gradient checkpointing on. Preset "full"
            (every Linear/1x1/3x3 conv of the attention, resnet and up/down blocks) is the fair side: the built-in
            adapts every layer with a weight. Preset "transformer" (kohya's default) is an extra line.
            Timed from `Hooks(on_step)` timestamps after the warm-up steps.
* builtin   `comfy_extras.nodes_train.TrainLoraNode().train(...)` called in-process under `torch.inference_mode()`
            as ComfyUI's executor calls it: algorithm LoRA, training_dtype fp32, lora_dtype fp32 (the closest
            to ours; this version offers bf16|fp32 only), gradient_checkpointing on, loss MSE, AdamW. Timed per step
            by a global optimizer step-post hook (torch.optim.optimizer.register_optimizer_step_post_hook): one
            timestamp per `optimizer.step()`; with grad_accumulation 1 that is one per training step, so its set-up
            (adapter creation, model load, guider preparation) is excluded, like our warm-up. As a cross-check, the
            first round also runs it at two step counts and divides the wall-time difference by the step difference.
* floor     forward + backward + fused AdamW of `model.model.diffusion_model`, called directly as
            `ComfyHost.predict` does, with our "full" adapters attached (`LoRANetwork` forward hooks), no
            checkpointing, same latent size, batch 1; nothing else.

The built-in leaves its weight wrappers in the UNet modules' `weight_function` lists after it returns (ComfyUI only
clears them at the next load of that model), so it trains on its own load of the checkpoint; ours and the floor
share another one, which is checked to be untouched before every timed run.

Rounds alternate the order of the sides; the median over rounds is reported.

    COMFYUI_PATH=/work/ComfyUI /work/comfyvenv/bin/python bench/comfy_step.py
    # last line: ours_over_builtin: <ratio>   (goal <= 0.6 on the CPU)
Environment: BENCH_THREADS (torch threads, default 2), BENCH_ROUNDS (default 3), LORALAB_TINY_CKPT_DIR.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGES, RESOLUTION, RANK, LR = 8, 128, 8, 5e-4
WARMUP, TIMED = 3, 10  # steps per run: WARMUP untimed, then TIMED timed
CHECK_STEPS = (6, 16)  # built-in cross-check: (T16 - T6) / 10
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def setup_paths() -> Path:
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        sys.exit("bench/comfy_step.py: COMFYUI_PATH is not set. Point it at a ComfyUI checkout and run this with a "
                 "Python that has ComfyUI's requirements, e.g.\n"
                 "  COMFYUI_PATH=/work/ComfyUI /work/comfyvenv/bin/python bench/comfy_step.py")
    for p in (ROOT / "tests" / "comfy", ROOT / "tests", ROOT):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    import harness

    path, reason = harness.comfyui_path_or_reason()
    if path is None:
        sys.exit(f"bench/comfy_step.py: {reason}")
    return path


def pack(name: str):
    import importlib

    return importlib.import_module(f"loralab_pack.{name}")


# ------------------------------------------------------------------------------------------------ set-up

class Bench:
    def __init__(self, comfyui: Path, tmp: Path):
        import torch

        import harness

        cache = Path(os.environ.get("LORALAB_TINY_CKPT_DIR") or ROOT / ".pytest_cache" / "d" / "loralab-tiny-checkpoints")
        self.ckpt = harness.build_checkpoints_subprocess(cache, comfyui, kinds=["sd15"])["sd15"]
        harness.import_comfy(comfyui)
        harness.import_pack("loralab_pack")
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm output from the built-in
        self.tmp = tmp
        # Two independent loads of the checkpoint, under inference_mode as CheckpointLoaderSimple runs in ComfyUI.
        with torch.inference_mode():
            self.model, self.clip, self.vae = harness.load_tiny(self.ckpt, te_layers=3)  # ours + floor
            self.builtin_model = harness.load_tiny(self.ckpt, te_layers=3)[0]  # the built-in's own copy
        self.host = pack("nodes.comfy_host").ComfyHost(self.model.clone(), self.clip, self.vae)
        self.before = self.snapshot()

        from shapes import write_shape_dataset

        config = pack("trainer.config")
        folder = write_shape_dataset(tmp / "data", IMAGES, size=(RESOLUTION, RESOLUTION))
        self.dataset_cfg = config.DatasetConfig(folder=str(folder))
        buckets = config.BucketConfig(resolutions=[RESOLUTION], min_bucket=RESOLUTION // 2,
                                      max_bucket=RESOLUTION * 2, step=64)
        with torch.inference_mode():  # as the Bucket & Cache Latents node runs
            dataset = pack("trainer.dataset").scan_dataset(self.dataset_cfg)
            self.latents = pack("trainer.cache").prepare_latents(dataset, buckets, self.host.encode_images,
                                                                 self.host.image_encoder_id, tmp / "cache")
            shapes = {tuple(s.latent.shape) for s in self.latents.samples}
            assert len(self.latents.samples) == IMAGES and len(shapes) == 1, shapes
            # The built-in's inputs: a LATENT dict of the same (unscaled) latents, CLIPTextEncode of each caption.
            self.captions = [s.caption for s in self.latents.samples]
            self.latent_dict = {"samples": torch.stack([s.latent for s in self.latents.samples])}
            self.positive = [self.clip.encode_from_tokens_scheduled(self.clip.tokenize(c))[0] for c in self.captions]
        self.latent_shape = tuple(self.latent_dict["samples"].shape[1:])
        self.runs = 0

    # -- the shared MODEL must stay as loaded
    def snapshot(self):
        unet = self.model.model.diffusion_model
        return ({k: v.clone() for k, v in unet.state_dict().items()},
                [(n, type(m).__name__) for n, m in unet.named_modules()])

    def check_untouched(self, where: str) -> None:
        weights, tree = self.before
        unet = self.model.model.diffusion_model
        now = unet.state_dict()
        problems = []
        if [(n, type(m).__name__) for n, m in unet.named_modules()] != tree:
            problems.append("module tree changed")
        if not all(k in now and now[k].dtype == weights[k].dtype and now[k].equal(weights[k]) for k in weights):
            problems.append("weights changed")
        for n, m in unet.named_modules():
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
                problems.append(f"{n or 'unet'} has hooks / a patched forward")
                break
            if getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
                problems.append(f"{n} has weight/bias functions")
                break
        if problems:
            raise SystemExit(f"the shared MODEL was changed ({where}): {'; '.join(problems)}")

    # -- ours
    def config(self, preset: str, steps: int):
        return pack("trainer.config").TrainConfig.from_dict({
            "steps": steps, "batch_size": 1, "seed": 0, "save_every": 0, "gradient_checkpointing": True,
            "network": {"rank": RANK, "alpha": RANK, "preset": preset},
            "optimizer": {"name": "adamw", "learning_rate": LR, "scheduler": "constant"}})

    def ours(self, preset: str, steps: int = WARMUP + TIMED) -> float:
        import torch

        import comfy.utils

        events, runlog_mod = pack("trainer.events"), pack("trainer.runlog")
        loop = pack("trainer.loop")
        self.check_untouched(f"before ours/{preset}")
        self.runs += 1
        run_dir = self.tmp / f"run{self.runs:02d}-{preset}"
        host = pack("nodes.comfy_host").ComfyHost(self.model.clone(), self.clip, self.vae)  # as the node does
        bar = comfy.utils.ProgressBar(steps)
        stamps = []

        def on_step(step, loss, lr):  # what the node's on_step does, plus the timestamp
            host.check_interrupt()
            bar.update_absolute(step, steps)
            stamps.append(time.perf_counter())

        with torch.inference_mode():  # ComfyUI's executor runs every node under inference_mode
            with runlog_mod.RunLog(run_dir) as runlog:
                reporter = events.ProgressReporter(events.fanout(lambda payload: None, runlog.write_latest),
                                                   node="bench", run=run_dir.name, total=steps)
                loop.train(host, self.latents, self.config(preset, steps), run_dir, dataset_cfg=self.dataset_cfg,
                           text_cache_dir=self.tmp / "text", reporter=reporter, runlog=runlog,
                           hooks=loop.Hooks(on_step=on_step))
        self.check_untouched(f"after ours/{preset}")
        return (stamps[-1] - stamps[WARMUP - 1]) / (len(stamps) - WARMUP)

    # -- ComfyUI's built-in Train LoRA
    def builtin(self, steps: int = WARMUP + TIMED) -> tuple[float, float]:
        """(seconds per step from per-step timestamps, wall seconds of the whole node call)."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from comfy_extras.nodes_train import TrainLoraNode

        stamps = []
        handle = register_optimizer_step_post_hook(
            lambda *_: stamps.append(time.perf_counter()))
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                TrainLoraNode().train(
                    model=self.builtin_model, latents=self.latent_dict, positive=self.positive, batch_size=1,
                    steps=steps, grad_accumulation_steps=1, learning_rate=LR, rank=RANK, optimizer="AdamW",
                    loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                    gradient_checkpointing=True, existing_lora="[None]")
        finally:
            wall = time.perf_counter() - start
            handle.remove()
        assert len(stamps) == steps, (len(stamps), steps)
        return (stamps[-1] - stamps[WARMUP - 1]) / (len(stamps) - WARMUP), wall

    # -- the floor
    def floor(self, steps: int = WARMUP + TIMED) -> float:
        import torch

        network_mod = pack("trainer.network")
        self.check_untouched("before floor")
        host = self.host
        cfg = self.config("full", steps)
        stamps = []
        with torch.inference_mode(False), torch.enable_grad(), host.training_session():
            network = network_mod.LoRANetwork(host.adapter_targets("full", True, False), cfg.network,
                                              device=host.device, generator=torch.Generator().manual_seed(0))
            optimizer = torch.optim.AdamW(network.parameters(), lr=LR, fused=True)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, *self.latent_shape, generator=gen)
            context = torch.randn(1, 77, host.context_width, generator=gen)
            target = torch.randn(x.shape, generator=gen)
            with network.attached():
                for _ in range(steps):
                    t = torch.randint(0, 1000, (1,), generator=gen).float()
                    out = host.unet(x, t, context=context, y=None, control=None, transformer_options={})
                    torch.nn.functional.mse_loss(out, target).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stamps.append(time.perf_counter())
        self.check_untouched("after floor")
        return (stamps[-1] - stamps[WARMUP - 1]) / (len(stamps) - WARMUP)


def count_adapters(bench: Bench) -> str:
    full = len(bench.host.adapter_targets("full", True, False))
    transformer = len(bench.host.adapter_targets("transformer", False, False))
    mods = [m for m in bench.builtin_model.model.modules() if hasattr(m, "weight_function")]
    lora = sum(1 for m in mods if getattr(m, "weight", None) is not None and m.weight.ndim >= 2)
    diffs = sum(1 for m in mods if getattr(m, "weight", None) is not None and m.weight.ndim < 2)
    biases = sum(1 for m in mods if getattr(m, "bias", None) is not None)
    return (f"adapters: ours full {full} LoRA modules, ours transformer {transformer}; built-in {lora} LoRA "
            f"modules + {diffs} norm-weight diffs + {biases} bias diffs (whole BaseModel)")


def main() -> None:
    comfyui = setup_paths()
    import torch

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loralab-comfy-step-") as tmp_name:
        bench = Bench(comfyui, Path(tmp_name))
        print(f"tiny SD1.5 ({sum(p.numel() for p in bench.model.model.diffusion_model.parameters()) / 1e6:.1f} M UNet "
              f"params), {IMAGES} images {RESOLUTION}px -> latents {bench.latent_shape}, batch 1, rank {RANK}, "
              f"AdamW lr {LR}, fp32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{WARMUP} warm-up + {TIMED} timed steps per run, {ROUNDS} rounds (order rotates)")
        print(count_adapters(bench))
        sides = {
            "floor": bench.floor,
            "ours_full": lambda: bench.ours("full"),
            "builtin": lambda: bench.builtin()[0],
            "ours_transformer": lambda: bench.ours("transformer"),
        }
        results = {name: [] for name in sides}
        order = list(sides)
        check = None
        for r in range(ROUNDS):
            if r == 0:  # the built-in's set-up-free cross-check: wall(16 steps) - wall(6 steps)
                walls = [bench.builtin(n)[1] for n in CHECK_STEPS]
                check = (walls[1] - walls[0]) / (CHECK_STEPS[1] - CHECK_STEPS[0])
            rotated = order[r % len(order):] + order[:r % len(order)]
            for name in rotated:
                results[name].append(sides[name]())
            print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1] * 1000:.0f} ms" for n in order), flush=True)
        med = {name: statistics.median(v) for name, v in results.items()}
    floor = med["floor"]
    print()
    print(f"{'side':<34}{'s/step':>10}{'x floor':>10}")
    labels = {"floor": "floor (fwd+bwd+AdamW, full)", "ours_full": "ours, preset full",
              "ours_transformer": "ours, preset transformer", "builtin": "built-in TrainLoraNode"}
    for name in ("floor", "ours_full", "ours_transformer", "builtin"):
        print(f"{labels[name]:<34}{med[name]:>10.4f}{med[name] / floor:>10.2f}")
    print(f"{'built-in, wall-difference check':<34}{check:>10.4f}{check / floor:>10.2f}")
    print(f"(total bench time {time.perf_counter() - t0:.0f} s)")
    print(f"ours_over_builtin: {med['ours_full'] / med['builtin']:.3f}")


if __name__ == "__main__":
    main()
