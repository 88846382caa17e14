"""The `loraplane demo` flags, and the entry point the main CLI calls."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loraplane.demo.model import default_cache_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Start an embedded Redis, the control plane and a data plane on free local ports; train three "
                     "LoRA adapters on a small local model (once: both are cached); register them and stream one "
                     "prompt through all three and the base model in one batch. No GPU, no network.")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where the base model and adapters are kept between runs (default: {default_cache_dir()})")
    p.add_argument("--serve", action="store_true", help="keep the servers running after the demo, until Ctrl-C")
    p.add_argument("--small", action="store_true", help="a smaller model and shorter training (what the tests use)")
    p.add_argument("--steps", type=int, help="optimizer steps per adapter (default: 200, or 100 with --small)")
    p.add_argument("--verbose", action="store_true", help="show the servers' own logs")


def run(args: argparse.Namespace) -> int:
    from loraplane.demo.run import run_demo
    from loraplane.demo.train import TrainingFailed

    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if not args.verbose:
        # The servers log every start and fetch at INFO; here they would bury the demo's own output.
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run_demo(args.cache_dir, serve=args.serve, small=args.small, steps=args.steps)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
