"""Several processes, one run: the headless engine under real `torchrun` processes (gloo, CPU), and its plumbing.

The end-to-end tests train the demo config (`python -m trainer demo --prepare-only` writes it): two processes at
batch 2 against one at batch 4, a two-process run stopped by the launcher's SIGTERM / SIGINT and resumed (on two
processes, and on one), and what the run folder holds afterwards. Every process uses one CPU thread.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.errors import ConfigError
from trainer.training import distributed

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS, SAVE_EVERY = 40, 10
LAUNCH_TIMEOUT = 240  # seconds; a run takes 15-40 s here (mostly importing torch and diffusers per process)

# What `torchrun --standalone --nproc_per_node 2` sets for process 1 (besides TORCHELASTIC_* and the like).
TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                "ROLE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1"}
# Process 3 of `torchrun --nnodes 2 --nproc_per_node 2 --rdzv-endpoint 10.0.0.1:29500 ...` on the second machine.
TWO_MACHINES_ENV = {**TORCHRUN_ENV, "RANK": "3", "WORLD_SIZE": "4", "GROUP_RANK": "1", "ROLE_RANK": "3",
                    "MASTER_ADDR": "10.0.0.1"}
# Recorded from process 1 of `accelerate launch --multi_gpu --num_processes 2 --mixed_precision no --dynamo_backend
# no` (accelerate 1.15.0, which starts torchrun underneath): the same variables plus accelerate's own.
ACCELERATE_ENV = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default",
                  "ACCELERATE_DYNAMO_USE_DYNAMIC": "False", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
                  "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False", "ACCELERATE_MIXED_PRECISION": "no",
                  "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "29500", "OMP_NUM_THREADS": "1", "RANK": "1", "ROLE_RANK": "1", "WORLD_SIZE": "2"}


# ------------------------------------------------------------------------------------------- plumbing, in-process
@pytest.mark.parametrize("environ, expected", [
    (TORCHRUN_ENV, distributed.LaunchEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)),
    (TWO_MACHINES_ENV, distributed.LaunchEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)),
    (ACCELERATE_ENV, distributed.LaunchEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)),
    # plain `python -m trainer`, and `accelerate launch` with one process or --cpu (its simple launcher sets no
    # RANK / WORLD_SIZE): one process, as before
    ({"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}, None),
])
def test_the_launchers_environment_is_detected(environ, expected):
    assert distributed.detect(environ) == expected


def test_an_incomplete_launcher_environment_names_what_is_missing():
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT is not set; start the run with `torchrun`"):
        distributed.detect({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="RANK = 2 must be between 0 and WORLD_SIZE - 1 = 1"):
        distributed.detect({**TORCHRUN_ENV, "RANK": "2"})


def test_cuda_means_the_gpu_of_each_process():
    env = distributed.detect(ACCELERATE_ENV)
    assert distributed.process_device("cuda", env) == "cuda:1"
    assert distributed.process_device("cuda:0", env) == "cuda:0"  # an explicit index is the user's choice
    assert distributed.process_device("cpu", env) == "cpu"


def test_each_process_takes_its_consecutive_slice_and_a_short_batch_is_not_padded():
    assert [distributed.share([10, 11, 12, 13], 2, r) for r in (0, 1)] == [[10, 11], [12, 13]]
    assert [distributed.share([10, 11, 12], 2, r) for r in (0, 1)] == [[10, 11], [12]]
    assert [distributed.share([10], 2, r) for r in (0, 1)] == [[10], []]
    assert distributed.share([10, 11, 12, 13], 4) == [10, 11, 12, 13]  # one process: the whole batch


def test_every_place_in_the_batch_order_has_its_own_seed_and_a_resume_repeats_them():
    from trainer.data.batching import BatchSampler

    class Sample:
        def __init__(self, bucket):
            self.repeats, self.bucket, self.resolution, self.image_path = 2, bucket, 64, f"{bucket}"

    samples = [Sample((64, 64)) for _ in range(5)] + [Sample((32, 64)) for _ in range(3)]
    sampler = BatchSampler(samples, 4, seed=7)
    draws = [sampler.next_draws() for _ in range(3 * sampler.batches_per_epoch)]  # three epochs
    seeds = [d.seed for batch in draws for d in batch]
    assert len(set(seeds)) == len(seeds)
    resumed = BatchSampler(samples, 4, seed=7)
    resumed.load_state_dict(BatchSampler(samples, 4, seed=7).state_dict())
    assert resumed.next_draws() == draws[0]


def test_a_sample_draws_the_same_flip_caption_timestep_and_noise_whatever_shares_its_batch(
        tiny_models, make_latents, tmp_path):
    """What makes 1 process x batch 4 equal 2 processes x batch 2: each sample's randomness is its own."""
    from shapes import write_shape_dataset

    from trainer.config import ObjectiveConfig
    from trainer.data.batching import BatchSampler
    from trainer.data.text import TextEmbeddings
    from trainer.hosts.diffusers_host import DiffusersHost
    from trainer.training.loop import SampleRng, collate, draw_noise

    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4), flip=True,
                                        shuffle_captions=True, caption_dropout=0.3)
    text = TextEmbeddings(host, 1, None, trainable=False)
    objective = ObjectiveConfig(noise_offset=0.05)
    draws = BatchSampler(latents.samples, 4, seed=3).next_draws()

    def draw(part):
        rngs = [SampleRng.keyed(d.seed) for d in part]
        x0, cond = collate(host, [latents.samples[d.index] for d in part], text, dataset_cfg, rngs, host.device)
        timesteps, noise = draw_noise(host.schedule, x0, rngs, objective)
        return x0, cond.context, timesteps, noise

    whole = draw(draws)
    halves = [torch.cat(parts) for parts in zip(draw(draws[:2]), draw(draws[2:]))]
    assert all(torch.equal(a, b) for a, b in zip(whole, halves))


def _four_processes(rank: int, store: str, out: str) -> None:
    """One of four processes on two 'machines' (LOCAL_RANK = rank % 2), in a real gloo group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    try:
        with distributed.one_writer_first():
            with open(out, "a") as f:
                f.write(f"{rank} {time.monotonic()}\n")
            time.sleep(0.3)  # a slow writer: the next ones must wait for it
        # p0 has a gradient on every process, p1 only on rank 0 (e.g. a short batch left the others nothing),
        # p2 on none (an adapter that never gets a gradient): it must stay without one, as on one process.
        p0, p1, p2 = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        p0.grad = torch.full((3,), float(rank + 1))
        p1.grad = torch.ones(3) if rank == 0 else None
        if rank == 3:
            distributed._stop.signalled = True  # as if SIGTERM had reached this process only
        loss = distributed.reduce_step([p0, p1, p2], loss_share=0.25 * (rank + 1))
        assert loss == pytest.approx(2.5)
        assert torch.equal(p0.grad, torch.full((3,), 10.0)) and torch.equal(p1.grad, torch.ones(3))
        assert p2.grad is None
        assert distributed.stop_agreed()  # every process stops after the same step
        weights = torch.nn.Parameter(torch.full((2,), float(rank)))
        distributed.broadcast_parameters([weights])
        assert torch.equal(weights.detach(), torch.zeros(2))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_four_processes_sum_gradients_agree_on_stop_and_write_caches_one_writer_first(tmp_path):
    import torch.multiprocessing as mp

    order = tmp_path / "order.txt"
    mp.spawn(_four_processes, args=(str(tmp_path / "store"), str(order)), nprocs=4)
    ranks = [int(line.split()[0]) for line in sorted(order.read_text().splitlines(), key=lambda l: float(l.split()[1]))]
    assert ranks[:2] == [0, 2] and sorted(ranks[2:]) == [1, 3]  # rank 0, the other machine's first, the rest


def test_under_a_launcher_a_stop_signal_waits_for_the_end_of_the_step(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with distributed.launched("cpu") as device:
        assert device == "cpu" and distributed.is_distributed() and distributed.is_main()
        with pytest.raises(KeyboardInterrupt):  # loading or caching: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        with distributed.stop_after_step():
            os.kill(os.getpid(), signal.SIGTERM)  # training: no exception mid-step ...
            time.sleep(0.05)
            assert not distributed.stop_agreed()
            distributed.reduce_step([torch.nn.Parameter(torch.zeros(1))], 0.5)
            assert distributed.stop_agreed()  # ... the step's all-reduce tells every process to stop
        assert not distributed.stop_agreed()
    assert not distributed.is_distributed()


# ------------------------------------------------------------------------------------------- real torchrun runs
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*distributed.LAUNCHER_VARIABLES, "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def _command(config: Path, processes: int, *extra: str) -> list[str]:
    train = ["-m", "trainer", "train", "--config", str(config), *extra]
    if processes == 1:
        return [sys.executable, *train]
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes), *train]


def _train(config: Path, processes: int, *extra: str) -> str:
    done = subprocess.run(_command(config, processes, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _stop_midway(config: Path, processes: int, sig: signal.Signals) -> str:
    """Start a run, send `sig` to the launcher once the first step is printed (Ctrl-C in a terminal reaches only
    torchrun: its workers run in their own sessions), and return the output."""
    proc = subprocess.Popen(_command(config, processes), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step "):
                proc.send_signal(sig)
                break
        lines += proc.communicate(timeout=LAUNCH_TIMEOUT)[0].splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert proc.returncode != 0 and "stopped at step" in output, output[-3000:]
    return output


def _variant(demo: Path, name: str, batch_size: int, run: str = "") -> Path:
    """The demo config with another per-process batch and its own outputs (``run`` names a shared run folder)."""
    config = json.loads((demo / "demo_config.json").read_text())
    config["train"].update(batch_size=batch_size, steps=STEPS, save_every=SAVE_EVERY)
    run = run or name
    config["output"] = {"run_dir": str(demo / "runs" / run), "lora": str(demo / "loras" / f"{name}.safetensors"),
                        "cache_dir": str(demo / "cache")}
    path = demo / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def _losses(run_dir: Path) -> list[float]:
    from trainer.monitor.runlog import read_history

    return read_history(run_dir)["loss"]


def _final(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final.safetensors"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "demo"
    done = subprocess.run([sys.executable, "-m", "trainer", "demo", "--out", str(out), "--prepare-only"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "demo_config.json").is_file() and "demo config:" in done.stdout
    return out


@pytest.fixture(scope="module")
def two_processes(demo) -> tuple[Path, str]:
    """The demo config on two processes at batch 2 (the first run: it fills the cache), uninterrupted."""
    output = _train(_variant(demo, "two", 2), 2)
    return demo / "runs" / "two", output


@pytest.mark.slow
def test_two_processes_at_batch_2_train_what_one_process_at_batch_4_trains(demo, two_processes):
    two, _ = two_processes
    _train(_variant(demo, "one", 4), 1)
    one = demo / "runs" / "one"
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4
    wa, wb = _final(one), _final(two)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    ups = [v for k, v in wb.items() if k.endswith("lora_up.weight")]
    assert ups and min(float(v.abs().max()) for v in ups) > 1e-3  # every adapter trained (up weights start at 0)


@pytest.mark.slow
def test_only_rank_0_writes_and_the_run_log_shows_the_global_batch(demo, two_processes):
    from safetensors import safe_open

    run, output = two_processes
    assert output.count("saved LoRA:") == 1 and output.count("model: ") == 1
    assert output.count("Cache: 0 hit(s), 16 encoded") == 1  # rank 0 encoded, rank 1 found everything cached
    assert "batch: 4 (2 per process x 2 processes)" in output
    assert "batch 4 (2 per process x 2 processes)" in output  # the run log's first line, before training
    assert "the memory estimate is per process (2 processes)" in output
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, STEPS + 1))  # each step once
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "estimate.txt", "final.safetensors",
                                                     "final_ema.safetensors", "history.jsonl", "latest.json",
                                                     "loss.png", "state"]
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step_000030", "step_000040"]  # keep_last 2
    assert sorted(p.name for p in (demo / "loras").iterdir() if p.name.startswith("two")) == [
        "two.safetensors", "two_ema.safetensors"]
    assert json.loads((run / "config.json").read_text())["batch"] == {"per_process": 2, "processes": 2, "global": 4}
    with safe_open(str(demo / "loras" / "two.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"]) == ("2", "4")


@pytest.mark.slow
def test_a_two_process_run_stopped_by_sigterm_resumes_exactly(demo, two_processes):
    from trainer.training.state import list_snapshots

    config = _variant(demo, "stopped", 2)
    run = demo / "runs" / "stopped"
    output = _stop_midway(config, 2, signal.SIGTERM)
    stopped_at = len(_losses(run))
    assert 0 < stopped_at < STEPS and not (run / "final.safetensors").exists(), output[-2000:]
    assert list_snapshots(run)[-1].name == f"step_{stopped_at:06d}"  # one resumable state, at the stop
    assert output.count("stopped at step") == 1
    _train(config, 2, "--resume")
    two, _ = two_processes
    assert _losses(run) == _losses(two)
    a, b = _final(run), _final(two)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_two_process_run_stopped_by_ctrl_c_resumes_on_one_process_with_the_same_global_batch(demo, two_processes):
    _stop_midway(_variant(demo, "moved", 2), 2, signal.SIGINT)
    run = demo / "runs" / "moved"
    assert 0 < len(_losses(run)) < STEPS
    output = _train(_variant(demo, "moved_one", 4, run="moved"), 1, "--resume")
    assert "resumed on 1 process(es); the state was saved on 2 (same global batch of 4)" in output
    two, _ = two_processes
    a, b = _losses(run), _losses(two)
    assert len(a) == STEPS and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4
    wa, wb = _final(run), _final(two)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
