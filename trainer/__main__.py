"""Command line: `python -m trainer train --config FILE` and `python -m trainer demo`.

Both also run under a launcher (`torchrun --nproc_per_node N -m trainer train --config FILE`, `accelerate launch`):
then this process joins the launcher's process group for the run (trainer/training/distributed.py)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="LoRA Lab headless trainer")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a LoRA from a JSON or YAML config on a local diffusers model")
    train.add_argument("--config", required=True, help="config file (see trainer/headless.py for the keys)")
    train.add_argument("--resume", action="store_true", help="continue the run in output.run_dir from its last state")
    demo = commands.add_parser("demo", help="train a tiny random model on a synthetic dataset on the CPU (~1 min)")
    demo.add_argument("--out", default="demo_output", help="folder for the model, dataset, run and LoRA")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--prepare-only", action="store_true",
                      help="write the model, dataset and OUT/demo_config.json without training (then train it with "
                           "`python -m trainer train --config OUT/demo_config.json`, or under torchrun)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from .errors import ConfigError, TrainingError, TrainingInterrupted

    try:
        if args.command == "demo":
            from .demo import prepare_demo, run_demo
            from .training import distributed

            if args.prepare_only:
                print(f"demo config: {prepare_demo(args.out, args.steps)[1]}")
            else:
                with distributed.launched("cpu"):
                    run_demo(args.out, args.steps)
        else:
            from .config import load_config_file
            from .headless import HeadlessSpec, run
            from .training import distributed

            config_path = Path(args.config)
            spec = HeadlessSpec.from_dict(load_config_file(config_path), base=config_path.resolve().parent)
            spec.resume = spec.resume or args.resume
            with distributed.launched(spec.device) as device:  # without a launcher's environment: as it is
                spec.device = device
                run(spec)
    except (ConfigError, TrainingError) as e:
        print(f"error{_which_process()}: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TrainingInterrupted):
        if not _which_process():
            print("stopped: a resumable state was saved; run again with --resume to continue", file=sys.stderr)
        return 130
    return 0


def _which_process() -> str:
    """"" on one process and on rank 0; " (process N of M)" elsewhere, so a message names the process it is from."""
    import os

    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return f" (process {rank} of {world})" if rank not in (None, "0") and world else ""


if __name__ == "__main__":
    sys.exit(main())
