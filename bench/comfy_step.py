"""Seconds per optimizer step inside ComfyUI: our engine vs ComfyUI's built-in Train LoRA vs the bare floor.

All sides train rank-8 LoRAs on the same tiny SD1.5 checkpoint (ComfyUI's own loader, CPU, fp32), the same cached
latents of 8 real 128 px PNG images (one bucket, latents 4x16x16), batch 1, AdamW, lr 5e-4:

* ours      `trainer.training.loop.train` through `ComfyHost`, wired as the Train LoRA node wires it (RunLog, progress
            reporter, interrupt check + ComfyUI ProgressBar in on_step), gradient_checkpointing=True, under
            `torch.inference_mode()` like every ComfyUI node. Preset "full" (Linear, 1x1 and 3x3 convs of the
            attention, resnet and up/down blocks) is the fair side: the built-in adapts every layer with a weight.
            Preset "transformer" (kohya's default) is an extra line. Timed from `Hooks(on_step)` timestamps.
* builtin   `comfy_extras.nodes_train.TrainLoraNode().train(...)` called in-process under `torch.inference_mode()`,
            as ComfyUI's executor calls it: algorithm LoRA, training_dtype fp32, lora_dtype fp32 (this version offers
            bf16|fp32; fp32 is ours), gradient_checkpointing on, loss MSE, AdamW, the same LATENT (unscaled latents)
            and one CLIPTextEncode-equivalent conditioning per caption. Timed per step by a global optimizer
            step-post hook (`torch.optim.optimizer.register_optimizer_step_post_hook`): one timestamp per
            `optimizer.step()`, i.e. per training step with grad accumulation 1, so its set-up (adapters, model load,
            guider) is excluded like our warm-up. Cross-check: (wall of a 16-step call - wall of a 6-step call) / 10.
* floor     forward + backward + fused AdamW of `model.model.diffusion_model`, called directly as
            `ComfyHost.predict` does, with our "full" adapters attached (`LoRANetwork` hooks), no checkpointing,
            batch 1; nothing else. "floor + checkpointing" is the same inside `ComfyHost.gradient_checkpointing(True)`:
            the cost of recomputation alone, so ours / that line is our engine's own overhead.

Every run does WARMUP untimed steps, then TIMED timed ones; rounds rotate the order of the sides and the median
over rounds is reported (wall seconds; process CPU seconds alongside, which other processes' load does not inflate).
One torch thread by default: on a shared 2-core box two threads get stalled by any other job (a 5x spread was seen).

Side effects: the built-in leaves its weight wrappers in the UNet modules' `weight_function` lists and instance
`forward` attributes after it returns (ComfyUI clears the wrappers only at that MODEL's next load), so it gets its own
load of the checkpoint; ours and the floor share another, checked to be untouched before and after every run.
A probe counts ResBlock forwards per step to show whether each side's gradient checkpointing really recomputes.

    COMFYUI_PATH=/work/ComfyUI /work/comfyvenv/bin/python bench/comfy_step.py
    # ours_over_builtin: <ratio>   (SD1.5, ours "full" / built-in; goal <= 0.6 on the CPU), then the flow row
    # (bench/comfy_flow.py, tiny Flux.1 dev) and the last line flow_ours_over_builtin: <ratio> (goal <= 0.6).
Environment: BENCH_THREADS (torch threads, default 1), BENCH_ROUNDS (default 5), BENCH_FLOW=0 (skip the flow row), LORALAB_TINY_CKPT_DIR (where the
tiny checkpoints are cached; default .pytest_cache/d/loralab-tiny-checkpoints, shared with the test suite).
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
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def setup_paths() -> Path:
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        sys.exit("bench/comfy_step.py: COMFYUI_PATH is not set. Point it at a ComfyUI checkout and run this with a "
                 "Python that has ComfyUI's requirements, e.g.\n"
                 "  COMFYUI_PATH=/work/ComfyUI /work/comfyvenv/bin/python bench/comfy_step.py")
    for p in (ROOT / "tests" / "comfy", ROOT / "tests", ROOT, ROOT / "bench"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    import harness

    path, reason = harness.comfyui_path_or_reason()
    if path is None:
        sys.exit(f"bench/comfy_step.py: {reason}")
    return path


def now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): the second is not inflated by other processes' load."""
    return time.perf_counter(), time.process_time()


def per_step(stamps) -> tuple[float, float]:
    """(wall, cpu) seconds per step over the steps after the warm-up."""
    n = len(stamps) - WARMUP
    return ((stamps[-1][0] - stamps[WARMUP - 1][0]) / n, (stamps[-1][1] - stamps[WARMUP - 1][1]) / n)


def pack(name: str):
    import importlib

    return importlib.import_module(f"loralab_pack.{name}")


# ------------------------------------------------------------------------------------------------ set-up

class Bench:
    def __init__(self, comfyui: Path, tmp: Path):
        import harness
        import torch

        cache = Path(os.environ.get("LORALAB_TINY_CKPT_DIR")
                     or ROOT / ".pytest_cache" / "d" / "loralab-tiny-checkpoints")  # shared with the test suite
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
        self.builtin_before = {k: v.clone() for k, v in self.builtin_model.model.state_dict().items()}

        from shapes import write_shape_dataset

        config = pack("trainer.config")
        folder = write_shape_dataset(tmp / "data", IMAGES, size=(RESOLUTION, RESOLUTION))
        self.dataset_cfg = config.DatasetConfig(folder=str(folder))
        buckets = config.BucketConfig(resolutions=[RESOLUTION], min_bucket=RESOLUTION // 2,
                                      max_bucket=RESOLUTION * 2, step=64)
        with torch.inference_mode():  # as the Bucket & Cache Latents node runs
            dataset = pack("trainer.data.dataset").scan_dataset(self.dataset_cfg)
            self.latents = pack("trainer.data.cache").prepare_latents(dataset, buckets, self.host.encode_images,
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
            "network": {"rank": RANK, "alpha": RANK, "targets": preset},
            "optimizer": {"name": "adamw", "learning_rate": LR, "scheduler": "constant"}})

    def ours(self, preset: str, steps: int = WARMUP + TIMED):
        import comfy.utils
        import torch

        events, runlog_mod = pack("trainer.monitor.events"), pack("trainer.monitor.runlog")
        loop = pack("trainer.training.loop")
        self.check_untouched(f"before ours/{preset}")
        self.runs += 1
        run_dir = self.tmp / f"run{self.runs:02d}-{preset}"
        host = pack("nodes.comfy_host").ComfyHost(self.model.clone(), self.clip, self.vae)  # as the node does
        bar = comfy.utils.ProgressBar(steps)
        stamps = []

        def on_step(step, loss, lr):  # what the node's on_step does, plus the timestamp
            host.check_interrupt()
            bar.update_absolute(step, steps)
            stamps.append(now())

        with torch.inference_mode():  # ComfyUI's executor runs every node under inference_mode
            with runlog_mod.RunLog(run_dir) as runlog:
                reporter = events.ProgressReporter(events.fanout(lambda payload: None, runlog.write_latest),
                                                   node="bench", run=run_dir.name, total=steps)
                loop.train(host, self.latents, self.config(preset, steps), run_dir, dataset_cfg=self.dataset_cfg,
                           text_cache_dir=self.tmp / "text", reporter=reporter, runlog=runlog,
                           hooks=loop.Hooks(on_step=on_step))
        self.check_untouched(f"after ours/{preset}")
        return per_step(stamps) if len(stamps) > WARMUP else None

    # -- ComfyUI's built-in Train LoRA
    def builtin(self, steps: int = WARMUP + TIMED) -> tuple[float, float]:
        """(seconds per step from per-step timestamps, wall seconds of the whole node call)."""
        start = time.perf_counter()
        stamps = run_builtin(self.builtin_model, self.latent_dict, self.positive, steps, RANK, LR)
        wall = time.perf_counter() - start
        return (per_step(stamps) if steps > WARMUP else None), wall

    # -- the floor
    def floor(self, steps: int = WARMUP + TIMED, checkpointing: bool = False):
        import torch

        network_mod = pack("trainer.adapters.network")
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
            with network.attached(), host.gradient_checkpointing(checkpointing):
                for _ in range(steps):
                    t = torch.randint(0, 1000, (1,), generator=gen).float()
                    out = host.unet(x, t, context=context, y=None, control=None, transformer_options={})
                    torch.nn.functional.mse_loss(out, target).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stamps.append(now())
        self.check_untouched("after floor")
        return per_step(stamps)

    # -- does gradient checkpointing recompute anything?
    def recompute_factor(self, run, steps: int = 2) -> float:
        """ResBlock forward calls per step / ResBlocks in the UNet, during `run(steps)`: 1.0 = nothing is recomputed
        (checkpointing has no effect), 2.0 = every ResBlock runs again in backward. Counted at class level, so it
        sees ResBlocks however a side wraps them."""
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        blocks = sum(isinstance(m, ResBlock) for m in self.model.model.diffusion_model.modules())
        calls = [0]
        original = ResBlock.forward

        def counting(module, *args, **kwargs):
            calls[0] += 1
            return original(module, *args, **kwargs)

        ResBlock.forward = counting
        try:
            run(steps)
        finally:
            ResBlock.forward = original
            for m in self.builtin_model.model.modules():  # the built-in leaves `m.forward = m.org_forward` behind
                if getattr(m.__dict__.get("forward"), "__func__", None) is counting:
                    del m.forward
        return calls[0] / (blocks * steps)

    def builtin_leftovers(self) -> str:
        """What the built-in left on its (own) MODEL's modules after returning, and whether base weights changed."""
        unet = self.builtin_model.model
        now = unet.state_dict()
        changed = sum(not now[k].equal(v) for k, v in self.builtin_before.items())
        wrapped = sum(bool(getattr(m, "weight_function", None) or getattr(m, "bias_function", None))
                      for m in unet.modules())
        forwards = sum("forward" in m.__dict__ for m in unet.modules())
        return (f"built-in after returning: {changed} base tensors changed, {wrapped} modules still carry its weight "
                f"wrappers (cleared only at that MODEL's next load), {forwards} modules keep an instance `forward`")


def run_builtin(model, latent_dict, positive, steps: int, rank: int, lr: float) -> list:
    """ComfyUI's built-in TrainLoraNode under inference_mode, as its executor calls it: the settings that match
    ours (LoRA, fp32, checkpointing, MSE, AdamW). Returns one (wall, cpu) stamp per optimizer step."""
    import torch
    from comfy_extras.nodes_train import TrainLoraNode
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps = []
    handle = register_optimizer_step_post_hook(lambda *_: stamps.append(now()))
    try:
        with torch.inference_mode():
            TrainLoraNode().train(
                model=model, latents=latent_dict, positive=positive, batch_size=1, steps=steps,
                grad_accumulation_steps=1, learning_rate=lr, rank=rank, optimizer="AdamW", loss_function="MSE",
                seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=True,
                existing_lora="[None]")
    finally:
        handle.remove()
    assert len(stamps) == steps, (len(stamps), steps)
    return stamps


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
    import warnings

    import torch

    torch.set_num_threads(THREADS)
    # The built-in asks for fp32 autocast, which CPU autocast does not support: torch warns and runs plain fp32.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loralab-comfy-step-") as tmp_name:
        bench = Bench(comfyui, Path(tmp_name))
        print(f"tiny SD1.5 ({sum(p.numel() for p in bench.model.model.diffusion_model.parameters()) / 1e6:.1f} M UNet "
              f"params), {IMAGES} images {RESOLUTION}px -> latents {bench.latent_shape}, batch 1, rank {RANK}, "
              f"AdamW lr {LR}, fp32, CPU, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
              f"{WARMUP} warm-up + {TIMED} timed steps per run, {ROUNDS} rounds (order rotates)")
        print(count_adapters(bench))
        ours_rf = bench.recompute_factor(lambda n: bench.ours("full", n))
        builtin_rf = bench.recompute_factor(lambda n: bench.builtin(n))
        print(f"gradient checkpointing, ResBlock forwards per step per ResBlock (1 = nothing recomputed, 2 = all): "
              f"ours {ours_rf:.1f}, built-in {builtin_rf:.1f}")
        if ours_rf < 1.5:
            print("WARNING: ours has gradient_checkpointing=True but recomputes nothing: ComfyHost."
                  "gradient_checkpointing has no effect on this UNet, so ours is timed WITHOUT checkpointing (and "
                  "without its memory saving)")
        walls = [bench.builtin(n)[1] for n in CHECK_STEPS]  # the built-in's set-up-free cross-check
        check = (walls[1] - walls[0]) / (CHECK_STEPS[1] - CHECK_STEPS[0])
        print(bench.builtin_leftovers())
        sides = {
            "floor": bench.floor,
            "ours_full": lambda: bench.ours("full"),
            "builtin": lambda: bench.builtin()[0],
            "floor_ckpt": lambda: bench.floor(checkpointing=True),
            "ours_transformer": lambda: bench.ours("transformer"),
        }
        results = {name: [] for name in sides}
        order = list(sides)
        for r in range(ROUNDS):
            for name in order[r % len(order):] + order[:r % len(order)]:
                results[name].append(sides[name]())
            print(f"round {r + 1} (wall ms/step): " + ", ".join(f"{n} {results[n][-1][0] * 1000:.0f}" for n in order),
                  flush=True)
        wall = {name: statistics.median(v[0] for v in runs) for name, runs in results.items()}
        cpu = {name: statistics.median(v[1] for v in runs) for name, runs in results.items()}
    floor = wall["floor"]
    print()
    print(f"{'side (median over rounds)':<44}{'s/step':>9}{'x floor':>9}{'cpu s/step':>12}")
    labels = {"floor": "floor: fwd+bwd+AdamW, full adapters",
              "floor_ckpt": "floor + ComfyHost.gradient_checkpointing",
              "ours_full": "ours, preset full (fair side)",
              "ours_transformer": "ours, preset transformer",
              "builtin": "built-in TrainLoraNode"}
    for name in ("floor", "floor_ckpt", "ours_full", "ours_transformer", "builtin"):
        print(f"{labels[name]:<44}{wall[name]:>9.4f}{wall[name] / floor:>9.2f}{cpu[name]:>12.4f}")
    print(f"{'built-in, (wall 16 steps - wall 6 steps) / 10':<44}{check:>9.4f}{check / floor:>9.2f}")
    print(f"ours transformer / built-in: {wall['ours_transformer'] / wall['builtin']:.3f}; "
          f"ours full / floor+checkpointing: {wall['ours_full'] / wall['floor_ckpt']:.3f}; "
          f"total bench time {time.perf_counter() - t0:.0f} s")
    print(f"ours_over_builtin: {wall['ours_full'] / wall['builtin']:.3f}")
    if os.environ.get("BENCH_FLOW", "1") != "0":
        from comfy_flow import flow_rows  # bench/comfy_flow.py: the same comparison on a tiny Flux.1 dev

        with tempfile.TemporaryDirectory(prefix="loralab-comfy-flow-") as tmp_name:
            ratio = flow_rows(Path(tmp_name), now, per_step, WARMUP, TIMED, ROUNDS)
        print(f"flow_ours_over_builtin: {ratio:.3f}")


if __name__ == "__main__":
    main()
