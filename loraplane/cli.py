"""The `loraplane` command: servers, admin and generation subcommands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import grpc

from loraplane import admin_cli, generate_cli
from loraplane.errors import LoraplaneError


def _control_plane(sub) -> None:
    from control_plane import config

    p = sub.add_parser("control-plane", help="run the control plane (adapter registry and distribution)")
    config.add_arguments(p)

    def run(args) -> int:
        from control_plane.server import serve

        asyncio.run(serve(config.from_args(args)))
        return 0

    p.set_defaults(func=run)


def _data_plane(sub) -> None:
    from data_plane.server import config

    p = sub.add_parser("data-plane", help="run a data plane (generation on one GPU, adapter caches)")
    config.add_arguments(p)

    def run(args) -> int:
        from data_plane.server.app import serve

        asyncio.run(serve(config.from_args(args)))
        return 0

    p.set_defaults(func=run)


def _demo(sub) -> None:
    from loraplane.demo import cli as demo_cli

    p = sub.add_parser("demo", help="run a whole loraplane locally with three freshly trained adapters (no GPU, no network)")
    demo_cli.add_arguments(p)
    p.set_defaults(func=demo_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplane", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _control_plane(sub)
    _data_plane(sub)
    _demo(sub)
    admin_cli.add_parser(sub)
    generate_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except LoraplaneError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.code == grpc.StatusCode.UNAUTHENTICATED and args.command == "generate":
            print("hint: whatever fronts the data plane wants a token: give it with --token-file FILE or --token",
                  file=sys.stderr)
        elif e.code == grpc.StatusCode.UNAUTHENTICATED:
            print("hint: give the admin token with --token-file FILE, --token or env LORAPLANE_ADMIN_TOKEN; a "
                  "control plane started without one wrote it to DATA_DIR/admin-token", file=sys.stderr)
        return 2
    except ValueError as e:  # configuration errors from the dataclass validators
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
