"""Command line: `python -m trainer train --config FILE` and `python -m trainer demo`."""
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from .errors import ConfigError, TrainingError

    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.steps)
        else:
            from .config import load_config_file
            from .headless import HeadlessSpec, run

            config_path = Path(args.config)
            spec = HeadlessSpec.from_dict(load_config_file(config_path), base=config_path.resolve().parent)
            spec.resume = spec.resume or args.resume
            run(spec)
    except (ConfigError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped: a resumable state was saved; run again with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
